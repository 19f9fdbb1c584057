"""Training cost and held-out accuracy of the speculation model by size, on one trace, in one run.

    python benchmarks/bench_neural_train.py [--trace traces/tiny-learned.parquet]
        [--presets tiny,small,baseline] [--time-limit 900] [--device cpu] [--threads 1]

For each preset: train (seeded, the default request split), then evaluate on the held-out TEST
requests beside the frequency, recency and Markov baselines fitted on the same training requests
(the baselines are the same for every preset: they are the in-run reference). Prints training
seconds, epochs, seconds per epoch, why training stopped, and top-1 / top-3 / P@K one layer ahead.
`baseline` is the seed's size (256d/8h/4L); the seed trained it on a GPU: with `--device cuda`
this is that measurement, on a CPU run it is bounded by `--time-limit` (said in the `stopped` column).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(ROOT / "traces" / "tiny-learned.parquet"))
    ap.add_argument("--presets", default="tiny,small,baseline")
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds of training per preset at most")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    from moesim.predictors.neural.evaluation import evaluate
    from moesim.predictors.neural.training import device_description, train

    torch.set_num_threads(a.threads)
    print(f"trace {a.trace}; device {device_description(torch.device(a.device))}")
    rows, baselines = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets.split(","):
            out = Path(tmp) / f"{preset}.pt"
            t = time.perf_counter()
            ck = train("speculation", a.trace, preset=preset, output=out, device=a.device, progress=False,
                       time_limit_s=a.time_limit, keep_train_state=False, log=lambda m: None)
            wall = time.perf_counter() - t
            rep = evaluate(out, device=a.device, measure=False)
            tab = next(x for x in rep["tables"] if x["offset"] == 1)
            model = tab["rows"][0]
            epochs = len(ck.get("history") or []) or None
            rows.append((preset, ck.get("parameters"), wall, epochs, ck.get("best_epoch"), ck.get("stopped"), model))
            baselines = [r for r in tab["rows"][1:] if r["name"] in ("frequency", "recency")
                         or r["name"].startswith("markov")]
            k_metric = "P@K" if "P@K" in model else None
            print(f"{preset:9s} {ck.get('parameters'):>10,} params  train {wall:7.1f} s  epochs {epochs}  "
                  f"best {ck.get('best_epoch')}  stopped {ck.get('stopped')}  top1 {model.get('top1', 0):.3f}"
                  + (f"  {k_metric} {model[k_metric]:.3f}" if k_metric else ""), flush=True)
    k_metric = "P@K" if "P@K" in rows[0][6] else "top10"
    print()
    print(f"| model | parameters | train s | epochs | s/epoch | stopped | top-1 | top-3 | {k_metric} |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for preset, params, wall, epochs, best, stopped, m in rows:
        per = f"{wall / epochs:.1f}" if epochs else "–"
        print(f"| speculation {preset} | {params:,} | {wall:.0f} | {epochs or '–'} (best {best}) | {per} | {stopped} "
              f"| {100 * m['top1']:.1f} | {100 * m['top3']:.1f} | {100 * m[k_metric]:.1f} |")
    for b in baselines or []:
        print(f"| {b['name']} | | | | | | {100 * b['top1']:.1f} | {100 * b['top3']:.1f} | {100 * b[k_metric]:.1f} |")


if __name__ == "__main__":
    main()
