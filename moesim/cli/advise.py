"""`moesim advise`: search deployments under an SLO, print the answer (registered on the main group)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from moesim.cli.util import executor_options, guard
from moesim.sweep.executors import executor_names


def _num(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


SHORT = {"cache_fraction": "cache", "cache.gpu.policy": "policy", "cache.gpu.partition": "partition",
         "batch.size": "batch", "batch.scheduler": "scheduler"}


def _fmt_config(cfg: dict) -> str:
    """A configuration on one line: `hardware` first, short knob names."""
    items = sorted(cfg.items(), key=lambda kv: kv[0] != "hardware")
    return " ".join(f"{SHORT.get(k, k)}={v}" for k, v in items)


def _print(doc: dict, out: Path, echo) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = doc["objective_metric"]
    t = Table(title=f"advise {doc['name']}: Pareto set ({' vs '.join(doc['pareto_metrics'])}), "
                    f"SLO {doc['slo']['percentile']} " + ", ".join(f"{k} <= {doc['slo'][k]:g}" for k in
                                                                   ("tpot_ms", "ttft_ms") if doc["slo"][k]))
    for c in ("configuration", "tokens/s", "tokens/$", "TPOT ms", "TTFT ms", "$/h"):
        t.add_column(c, justify="left" if c == "configuration" else "right")
    for r in doc["pareto"]:
        t.add_row(_fmt_config(r["config"]), f"{r['tokens_per_s']:.2f}", _num(r["tokens_per_dollar"], "{:.0f}"),
                  _num(r["tpot_ms"], "{:.1f}"), _num(r["ttft_ms"], "{:.1f}"), _num(r["price_per_hour"], "{:.3f}"))
    Console(width=200).print(t)
    echo(f"{doc['trials']} trials: {doc['simulations']} simulated, {doc['pruned']} pruned, {doc['failed']} failed, "
         f"{doc['feasible']} distinct configurations met the SLO (space: {doc['space_size']} configurations)")
    if len(doc["per_hardware"]) > 1 or not doc.get("best"):
        for hw, h in doc["per_hardware"].items():
            b = h["best"]
            echo(f"  {hw}: " + (f"best {metric} {b['objective']:.4g} ({_fmt_config(b['config'])})" if b else
                               f"nothing met the SLO in {h['simulated']} configurations (lowest TPOT "
                               f"{_num(h['lowest_tpot_ms'], '{:.0f}')} ms)"))
    best, default = doc.get("best"), doc.get("default")
    if best is None:
        echo("no configuration met the SLO")
        return
    echo(f"recommended: {_fmt_config(best['config'])}")
    echo(f"  {metric} {best['objective']:.4g} (tokens/s {best['tokens_per_s']:.2f}, TPOT {best['tpot_ms']:.1f} ms)")
    if default is not None:
        ok = "meets" if default["slo_ok"] else "misses"
        echo(f"  default configuration ({_fmt_config(default['config'])}): {metric} {default['objective']:.4g}, "
             f"{ok} the SLO")
    if doc["importances"]:
        echo("knobs that mattered (PED-ANOVA importance): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                     list(doc["importances"].items())[:4]))
    echo(f"scenario: {out / doc['recommended']}   report: {out / 'report.html'}")


@click.command("advise")
@click.argument("advise_file", metavar="ADVISE.yaml", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="output dir (default: the file's output:, else reports/<name>/); a rerun resumes the search")
@executor_options(executor_names(), "configurations are simulated",
                  "configurations simulated at once (default: all cores)")
@click.option("--trials", type=int, help="override search.trials (configurations to simulate)")
@click.option("--no-report", is_flag=True, help="do not write report.html")
@guard
def advise(advise_file, output, executor, address, workers, trials, no_report):
    """Search deployments of a model under an SLO with optuna, simulating each configuration.

    Writes DIR/recommended.yaml (a scenario `moesim run` takes as is), DIR/advise.json (the
    recommendation, the Pareto set, knob importances), DIR/trials.parquet and DIR/report.html.
    Exit status 0 with a recommendation, 1 when no configuration met the SLO, 2 for a bad file.
    """
    from moesim.errors import InputError
    from moesim.sweep.executors import get_executor
    from moesim.advise.outputs import write_outputs
    from moesim.advise.search import run_search
    from moesim.advise.spec import load_advise

    spec = load_advise(advise_file)
    if trials is not None:
        if trials < 1:
            raise InputError(f"must be >= 1 (got {trials})", field="--trials")
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"trials": trials})})
    ex = get_executor(executor, workers=workers, address=address)
    out = Path(output or spec.output or Path("reports") / spec.name)
    outcome = run_search(spec, out, ex, file=advise_file, echo=lambda m: click.echo(m, err=True))
    doc = write_outputs(outcome, spec, out)
    if not no_report:
        from moesim.report import render_advise

        render_advise(out)
    _print(doc, out, click.echo)
    sys.exit(0 if doc.get("best") else 1)
