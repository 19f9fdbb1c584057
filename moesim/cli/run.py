"""`moesim run`: simulate one scenario, write its results and print the summary table."""
from __future__ import annotations

from pathlib import Path

import click

from moesim.cli.util import fmt_pct, print_metrics, run_notes, run_rows
from moesim.cli.util import guard as _guard


# ---- run ---------------------------------------------------------------------------------------

def _print_summary(s: dict, out: Path) -> None:
    sc = s["scenario"]
    pct = fmt_pct
    rows = run_rows(s)
    g = s.get("policy_gap")
    if g:
        cap = "n/a (LRU is optimal here)" if g["captured"] is None else pct(g["captured"])
        rows.append((f"LRU→Belady gap closed by {g['policy']} (replay)",
                     f"{cap}: misses lru {g['lru_misses']} / {g['policy']} {g['policy_misses']} / "
                     f"belady {g['belady_misses']}"))
    for tier, a in (s.get("cache_allocation") or {}).items():
        rows.append((f"{tier} per-layer allocation ({a['allocation']})", " ".join(map(str, a["per_layer"]))))
    print_metrics(f"{sc['name']}: {sc['model']['name']} on {sc['hardware']['name']}, "
                  f"predictor {sc['predictor']['name']}, batch {sc['batch']['size']}", rows, out)
    for note in run_notes(s):
        click.echo(f"note: {note}", err=True)


@click.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), help="output dir (default reports/<name>/)")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="override a scenario field by its dotted path, e.g. cache.gpu.capacity_experts=64")
@click.option("--events", is_flag=True, help="also write events.parquet (every transfer)")
@click.option("--quiet", is_flag=True, help="no table on the terminal")
@click.option("--no-report", is_flag=True, help="skip report.html")
@click.option("--why/--no-why", default=None,
              help="bottleneck analysis: simulate one-at-a-time what-ifs (2× PCIe, +25% cache, oracle, all "
                   "resident) and name the binding constraint [default: on when the what-ifs can run side by "
                   "side on this machine's cores, i.e. at most double the run time]")
@click.option("--engine", type=click.Choice(["auto", "fast", "simpy"]), default="auto", show_default=True,
              help="auto: a fast path without SimPy when the scenario allows it, else SimPy; simpy: force "
                   "the reference engine (same results)")
@_guard
def run(scenario, output, overrides, events, quiet, no_report, why, engine):
    """Simulate one SCENARIO (YAML) and write summary.json, steps.parquet, requests.parquet."""
    from moesim.config import load_scenario
    from moesim.engine.run import simulate
    from moesim.outdir import claim_run_dir
    from moesim.results import write_result

    sc = load_scenario(scenario, overrides)
    out = claim_run_dir(output or sc.output or Path("reports") / sc.name)
    from moesim.progress import token_progress

    with token_progress(not quiet) as progress:  # a bar on a terminal for a run longer than 2 s
        result = simulate(sc, record_events=events, progress=progress, engine=engine)
    for w in result.summary.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    write_result(result, out)
    from moesim.engine.fast import engine_line, write_engine_json

    write_engine_json(out, result.engine)
    if not quiet:
        click.echo(engine_line(result.engine), err=True)
    verdict = _why(scenario, overrides, sc, result.summary, out, why)
    if not no_report:
        from moesim.report import render_run

        render_run(out)
    if not quiet:
        _print_summary(result.summary, out)
        if verdict:
            click.echo(f"why: {verdict}")


def _why(path, overrides, sc, summary: dict, out: Path, why: bool | None) -> str | None:
    """Run the bottleneck what-ifs when asked, or by default when they can all run at once; the
    verdict sentence (None when not run)."""
    import os

    from moesim.advise.whatif import WHATIF_JSON, applicable, run_whatifs
    from moesim.config import apply_overrides, read_yaml
    from moesim.sweep.executors import get_executor

    todo, _ = applicable(sc)
    cores = os.cpu_count() or 1
    if why is None:  # side by side they add about one run's time; in rounds, more than that
        why = len(todo) <= cores
    if not why or not todo:
        (out / WHATIF_JSON).unlink(missing_ok=True)  # an older run's analysis no longer applies
        return None
    data = apply_overrides(read_yaml(path), overrides, str(path))
    data.setdefault("name", Path(path).stem)
    doc = run_whatifs(data, sc, summary, out, get_executor("local", workers=min(cores, len(todo))), file=str(path))
    return doc["verdict"]
