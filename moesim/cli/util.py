"""What every click command of moesim shares: bad input → one line and exit status 2."""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import click

from moesim.errors import InputError


def guard(fn):
    """InputError → `error: ...` on stderr and exit status 2; Ctrl-C → exit 130. No traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def fmt_ms(d: dict) -> str:
    """A latency summary (`mean`, `p50`, `p99` in ms) as one cell of a run's table."""
    return "-" if d["mean"] is None else f"{d['mean']:.2f} (p50 {d['p50']:.2f}, p99 {d['p99']:.2f})"


def fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@dataclass(frozen=True)
class TableStyle:
    """How a run's table rounds and words the rows every run has (`moesim run`'s table by default)."""

    rate_digits: int = 1            # tokens/s
    seconds_digits: int = 4         # makespan and stall
    makespan_first: bool = False    # makespan right after tokens/s (else after the latencies)
    cache: str = "GPU"              # the gpu tier's hit-rate label
    link: str = "over PCIe"         # the bytes row's label
    stall_of: str = " of makespan"  # after the stall's share
    utilisation: bool = True        # the GPU / PCIe utilisation row
    dedup: bool = True              # the dedup ratio row


REPLAY_STYLE = TableStyle(rate_digits=2, seconds_digits=3, makespan_first=True, cache="cache", link="link",
                          stall_of="", utilisation=False, dedup=False)


def run_rows(s: dict, style: TableStyle = TableStyle()) -> list[tuple[str, str]]:
    """The (metric, value) rows of a run's summary.json that every run's table shows."""
    ms, pct, sd = fmt_ms, fmt_pct, style.seconds_digits
    makespan = ("makespan", f"{s['makespan_s']:.{sd}f} s")
    rows = [("tokens/s", f"{s['tokens_per_s']:.{style.rate_digits}f}")]
    rows += [makespan] if style.makespan_first else []
    rows += [("TTFT ms mean", ms(s["ttft_ms"])), ("TPOT ms mean", ms(s["tpot_ms"]))]
    rows += [] if style.makespan_first else [makespan]
    rows += [(f"{style.cache} hit rate", pct(s["gpu_hit_rate"])), ("DRAM hit rate", pct(s["dram_hit_rate"])),
             ("hits / late / misses", f"{s['hits']} / {s['late_hits']} / {s['misses']}"),
             ("stall", f"{s['stall_s']:.{sd}f} s ({pct(s['stall_fraction'])}{style.stall_of})")]
    if style.utilisation:
        rows.append(("GPU / PCIe utilisation", f"{pct(s['gpu_utilization'])} / {pct(s['pcie_utilization'])}"))
    rows += [(f"bytes {style.link} / disk", f"{s['bytes_pcie'] / 1e9:.3f} GB / {s['bytes_disk'] / 1e9:.3f} GB"),
             ("prefetch issued/used/late/wasted", "{issued}/{used}/{late}/{wasted}".format(**s["prefetch"]))]
    if style.dedup:
        rows.append(("dedup ratio", pct(s["dedup_ratio"])))
    return rows


def print_metrics(title: str, rows, out, width: int | None = None) -> None:
    """A run's metric/value table on the terminal, then where its results are."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    Console(width=width).print(t)
    click.echo(f"results in {out}/")


def run_notes(s: dict) -> list[str]:
    """Explanations of a run's figures a reader could misread: a batch the trace could not fill,
    prefetches that were mostly late because the link is saturated."""
    notes = []
    b, ran = s["scenario"]["batch"], (s.get("scheduler") or {}).get("max_running")
    if ran is not None and ran < b["size"] and b.get("arrivals", "closed") == "closed":
        notes.append(f"batch.size is {b['size']} but at most {ran} requests ran at once: the trace has "
                     f"{s.get('requests', ran)} requests")
    pf = s.get("prefetch") or {}
    issued, late = pf.get("issued") or 0, pf.get("late") or 0
    if issued and late > issued / 2:
        sc = s["scenario"]
        layers = max(1, s["steps"] * sc["model"]["num_layers"])
        copy_ms = 1e3 * s["expert_bytes"] / (sc["hardware"]["pcie_h2d"]["bandwidth_gbps"] * 1e9)
        per_layer = s["transfers_pcie"] / layers
        notes.append(f"{late} of {issued} prefetches were late (still in flight when their layer needed them): "
                     f"a layer's copies take about {per_layer * copy_ms:.1f} ms over PCIe ({per_layer:.1f} experts "
                     f"x {copy_ms:.2f} ms) against {1e3 * s['compute_s'] / layers:.2f} ms of compute, so copies "
                     f"issued a layer or two ahead queue behind one another (link busy "
                     f"{fmt_pct(s.get('pcie_utilization'))}): prefetching can only start them earlier")
    return notes


def executor_options(executors: list[str], what: str, workers_help: str):
    """--executor (one of `executors`), --address and --workers of a command that simulates on the sweep executors
    (sweep, advise); `what` completes the --executor help: "where {what}: local processes, or a Ray cluster"."""

    def decorate(fn):
        fn = click.option("--workers", type=int, help=workers_help)(fn)
        fn = click.option("--address", metavar="auto|ray://HOST:PORT", help="Ray cluster to join (--executor ray)")(fn)
        return click.option("--executor", type=click.Choice(executors), default="local", show_default=True,
                            help=f"where {what}: local processes, or a Ray cluster")(fn)

    return decorate
