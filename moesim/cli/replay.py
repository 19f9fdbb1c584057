"""`moesim replay` (a scenario on the real executor or the simulator at a scale) and `moesim compare`
(a simulation against a real run). torch is imported only when `replay --real` runs."""
from __future__ import annotations

from pathlib import Path

import click

from moesim.cli.util import REPLAY_STYLE, fmt_pct, print_metrics, run_rows
from moesim.cli.util import guard as _guard

DTYPE_CHOICES = ["bfloat16", "float16", "float32"]


def _print_run(s: dict, out: Path) -> None:
    sc = s["scenario"]
    mode = s.get("mode", "simulated")
    pct = fmt_pct
    rows = run_rows(s, REPLAY_STYLE)
    real = s.get("real")
    if real:
        rows += [("device", real["device"]["name"]), ("dtype / threads", f"{real['dtype']} / {real['torch_threads']}"),
                 ("disk reads", (f"{real['io']['method']} (page cache after run: "
                                f"{'?' if real['io']['page_cache_after_run'] is None else pct(real['io']['page_cache_after_run'])})"))]
        for k, v in real["roles"].items():
            rows.append((f"{k}", v))
    print_metrics(f"{sc['name']} ({mode}): {sc['model']['name']}, predictor {sc['predictor']['name']}, "
                  f"batch {sc['batch']['size']}, cache {s['gpu_cache_experts']} experts", rows, out, width=150)


@click.command("replay")
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("--real/--sim", "real", default=False, show_default=True,
              help="--real: execute with real tensors and I/O; --sim: simulate the same (scaled) scenario")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="output dir (default reports/<name>-real or -sim/)")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="override a field of the original scenario (before scaling)")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="multiply MoE layers, FFN widths and vocabulary by F (0 < F <= 1)")
@click.option("--layers", type=int, default=None, help="MoE layers to keep (the trace's first N)")
@click.option("--requests", "max_requests", type=int, default=None, help="replay only the first N requests")
@click.option("--hardware", default=None,
              help="hardware profile of the written scenario (the simulation uses it; e.g. a measured profile)")
@click.option("--device", default="auto", show_default=True, help="--real: auto, cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="bfloat16", show_default=True,
              help="weights and activations dtype (sets model.bytes_per_param of the scaled scenario)")
@click.option("--threads", type=int, default=None, help="--real: torch CPU threads")
@click.option("--io", type=click.Choice(["auto", "odirect", "fadvise", "buffered"]), default="auto",
              show_default=True, help="--real: how expert reads bypass the page cache")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="--real: where the expert file goes (default: a temporary dir; kept and reused with --keep-files)")
@click.option("--keep-files", is_flag=True, help="--real: keep the expert file (in --workdir) for the next run")
@click.option("--events", is_flag=True, help="also write events.parquet (every transfer)")
@click.option("--quiet", is_flag=True)
@_guard
def replay(scenario, real, output, overrides, scale, layers, max_requests, hardware, device, dtype, threads, io,
           workdir, keep_files, events, quiet):
    """Run SCENARIO's trace, scaled down, for real (--real) or simulated (--sim), same output format.

    The scaled scenario and trace are written to the output dir (scenario.yaml, trace.parquet), so
    both modes — and `moesim run OUT/scenario.yaml` — run exactly the same thing. On a CPU-only
    machine the scenario's gpu tier is a RAM expert cache the CPU computes from, its dram tier host
    staging buffers, and loads are disk reads that bypass the page cache.
    """
    from moesim.config import read_yaml
    from moesim.real.scale import prepare
    from moesim.real.torchutil import DTYPES
    from moesim.results import write_result

    name = (read_yaml(scenario) or {}).get("name") if Path(scenario).is_file() else None
    out = Path(output or Path("reports") / f"{name or Path(scenario).stem}-{'real' if real else 'sim'}")
    sc, orig, notes = prepare(scenario, out, overrides, scale, layers, max_requests, hardware,
                              bytes_per_param=float(DTYPES[dtype]))
    if not quiet:
        m = sc.model
        click.echo(f"{'real' if real else 'simulated'} replay of {orig.model.name} as {m.name}: {m.num_layers} MoE "
                   f"layers x {m.num_experts} experts, expert {m.expert_bytes / 1e6:.2f} MB; "
                   f"cache {sc.cache.gpu.capacity_experts} experts"
                   + (f", dram {sc.cache.dram.capacity_experts}" if sc.cache.dram else ", every expert in host memory"),
                   err=True)
        for n in notes:
            click.echo(f"  note: {n}", err=True)
    if real:
        from moesim.real import replay_real

        scaling = {"scale": scale, "layers": sc.model.num_layers, "requests": max_requests, "notes": notes,
                   "original_model": orig.model.name}
        result = replay_real(sc, device=device, dtype=dtype, workdir=workdir, io=io, record_events=events,
                             threads=threads, keep_files=keep_files, trace_path=out / "trace.parquet",
                             scaling=scaling)
        if sc.cache.dram is None and not quiet:
            click.echo("  note: no dram tier: every expert was read into host memory before the clock started; "
                       "loads are link copies only (add cache.dram to read experts from the disk)", err=True)
    else:
        from moesim.engine.run import simulate

        result = simulate(sc, record_events=events)
        result.summary["mode"] = "simulated"
    write_result(result, out)
    if not quiet:
        _print_run(result.summary, out)
    else:
        click.echo(f"results in {out}/")


# ---- compare -------------------------------------------------------------------------------------

@click.command("compare")
@click.argument("sim_dir", type=click.Path(file_okay=False))
@click.argument("real_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="where compare.json, compare.md and compare_steps.parquet go (default REAL_DIR/compare)")
@click.option("--quiet", is_flag=True)
@_guard
def compare(sim_dir, real_dir, output, quiet):
    """Error of a simulation (SIM_DIR) against a real run (REAL_DIR) of the same scenario:
    total (makespan, tokens/s, TPOT, TTFT, hits, stall) and per step and per layer."""
    from moesim.cli.render import print_real_comparison as print_comparison
    from moesim.compare import compare_dirs, write_comparison

    cmp = compare_dirs(sim_dir, real_dir)
    out = Path(output or Path(real_dir) / "compare")
    write_comparison(cmp, out)
    if not quiet:
        print_comparison(cmp)
    click.echo(f"wrote {out}/compare.json, compare.md, compare_steps.parquet")
