"""The `moesim` command line. Bad input → one line on stderr naming file and field, exit 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cliutil import fmt_ms, fmt_pct, print_metrics
from .cliutil import guard as _guard
from .errors import InputError


@click.group()
@click.version_option(package_name="moesim")
def main():
    """Simulate Mixture-of-Experts inference with offloaded experts."""


# ---- run ---------------------------------------------------------------------------------------

def _print_summary(s: dict, out: Path) -> None:
    sc = s["scenario"]
    ms, pct = fmt_ms, fmt_pct
    rows = [
        ("tokens/s", f"{s['tokens_per_s']:.1f}"),
        ("TTFT ms mean", ms(s["ttft_ms"])),
        ("TPOT ms mean", ms(s["tpot_ms"])),
        ("makespan", f"{s['makespan_s']:.4f} s"),
        ("GPU hit rate", pct(s["gpu_hit_rate"])),
        ("DRAM hit rate", pct(s["dram_hit_rate"])),
        ("hits / late / misses", f"{s['hits']} / {s['late_hits']} / {s['misses']}"),
        ("stall", f"{s['stall_s']:.4f} s ({pct(s['stall_fraction'])} of makespan)"),
        ("GPU / PCIe utilisation", f"{pct(s['gpu_utilization'])} / {pct(s['pcie_utilization'])}"),
        ("bytes over PCIe / disk", f"{s['bytes_pcie'] / 1e9:.3f} GB / {s['bytes_disk'] / 1e9:.3f} GB"),
        ("prefetch issued/used/late/wasted", "{issued}/{used}/{late}/{wasted}".format(**s["prefetch"])),
        ("dedup ratio", pct(s["dedup_ratio"])),
    ]
    print_metrics(f"{sc['name']}: {sc['model']['name']} on {sc['hardware']['name']}, "
                  f"predictor {sc['predictor']['name']}, batch {sc['batch']['size']}", rows, out)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), help="output dir (default reports/<name>/)")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="override a scenario field by its dotted path, e.g. cache.gpu.capacity_experts=64")
@click.option("--events", is_flag=True, help="also write events.parquet (every transfer)")
@click.option("--quiet", is_flag=True, help="no table on the terminal")
@click.option("--no-report", is_flag=True, help="skip report.html")
@_guard
def run(scenario, output, overrides, events, quiet, no_report):
    """Simulate one SCENARIO (YAML) and write summary.json, steps.parquet, requests.parquet."""
    from .config import load_scenario
    from .engine.run import simulate
    from .results import write_result

    sc = load_scenario(scenario, overrides)
    out = Path(output or sc.output or Path("reports") / sc.name)
    result = simulate(sc, record_events=events)
    write_result(result, out)
    if not no_report:
        from .report import render_run

        render_run(out)
    if not quiet:
        _print_summary(result.summary, out)


@main.command()
def schema():
    """Print the scenario JSON Schema (for editors)."""
    from .config import scenario_json_schema

    click.echo(json.dumps(scenario_json_schema(), indent=2))


# ---- models and hardware -------------------------------------------------------------------------

@main.command()
def models():
    """List model presets with their key shapes and source."""
    from rich.console import Console
    from rich.table import Table

    from .models import get_preset, preset_names

    t = Table(title="model presets")
    for c in ("name", "MoE layers", "experts", "top-k", "shared", "hidden", "expert ffn", "expert MB", "source"):
        t.add_column(c)
    for n in preset_names():
        m = get_preset(n)
        t.add_row(n, str(m.num_layers), str(m.num_experts), str(m.top_k), str(m.num_shared_experts),
                  str(m.hidden_size), str(m.expert_intermediate_size), f"{m.expert_bytes / 1e6:.1f}", m.source)
    Console(width=200).print(t)


@main.group()
def hardware():
    """Hardware profiles (hardware_profiles/*.yaml)."""


@hardware.command("list")
@_guard
def hardware_list():
    from .hardware.profile import list_profiles, load_profile

    for n in list_profiles():
        p = load_profile(n)
        click.echo(f"{n:20s} {p.gpu.name:28s} PCIe {p.pcie_h2d.bandwidth_gbps:g} GB/s, "
                   f"HBM {p.gpu.hbm_bandwidth_gbps:g} GB/s, "
                   f"{p.gpu.peak_bf16_tflops:g} TFLOP/s")


@hardware.command("show")
@click.argument("name")
@_guard
def hardware_show(name):
    """Print a profile with every number's source."""
    import yaml

    from .hardware.profile import load_profile

    click.echo(yaml.safe_dump(load_profile(name).model_dump(mode="json", exclude_none=True), sort_keys=False))


# ---- traces ------------------------------------------------------------------------------------

@main.group()
def trace():
    """Generate and inspect routing traces (Parquet)."""


@trace.command("generate")
@click.option("--preset", default=None,
              help="model preset (the synthetic routing preset of the same name); with --preset-file, the model "
                   "whose shape the trace takes [default: the file's model]")
@click.option("--preset-file", type=click.Path(dir_okay=False), default=None,
              help="a fitted preset YAML (`moesim trace fit`): generate with its parameters; --requests, "
                   "--prompt-len and --decode-len default to the fitted trace's")
@click.option("--requests", "n_requests", type=int, default=8, show_default=True)
@click.option("--prompt-len", type=int, default=32, show_default=True)
@click.option("--decode-len", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model-seed", type=click.IntRange(min=0), default=None,
              help="draw the synthetic model (gates, popularity) from this seed and only the requests from --seed: "
                   "traces with one --model-seed and different --seed share a model [default: --seed draws both]")
@click.option("--pre-attn", is_flag=True, help="write the pre-attention hidden state column")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.pass_context
@_guard
def trace_generate(ctx, preset, preset_file, n_requests, prompt_len, decode_len, seed, model_seed, pre_attn, output):
    """Write a synthetic latent-gate trace for a model preset (or a fitted preset file)."""
    import numpy as np

    from .models import get_preset, preset_names
    from .traces.synthetic import generate_to_file

    params = label = None
    if preset_file is not None:
        from .traces.fit import spec_for_preset_file

        spec, params, doc = spec_for_preset_file(preset_file, preset)
        label = f"fitted:{Path(preset_file).name}"
        typical = doc.get("generate") or {}
        src = click.core.ParameterSource.DEFAULT
        if ctx.get_parameter_source("n_requests") == src and isinstance(typical.get("requests"), int):
            n_requests = typical["requests"]
        if ctx.get_parameter_source("prompt_len") == src and isinstance(typical.get("prompt_len"), int):
            prompt_len = typical["prompt_len"]
        if ctx.get_parameter_source("decode_len") == src and isinstance(typical.get("decode_len"), int):
            decode_len = typical["decode_len"]
    elif preset is None:
        raise InputError("give --preset (a model preset) or --preset-file (a fitted preset YAML)", field="--preset")
    else:
        try:
            spec = get_preset(preset)
        except KeyError:
            raise InputError(f"unknown preset {preset!r} (known: {', '.join(preset_names())})", field="--preset")
        label = preset
    for name, v in (("--requests", n_requests), ("--prompt-len", prompt_len)):
        if v <= 0:
            raise InputError(f"must be > 0 (got {v})", field=name)
    if decode_len < 0:
        raise InputError(f"must be >= 0 (got {decode_len})", field="--decode-len")
    generate_to_file(output, spec, params, preset=label, requests=n_requests, prompt_len=prompt_len,
                     decode_len=decode_len, rng=np.random.default_rng(seed), seed=seed, pre_attn=pre_attn,
                     model_seed=model_seed)
    click.echo(f"wrote {output}")


@trace.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="PATH [PATH_B]")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@_guard
def trace_info(paths, as_json):
    """Statistics of a trace: size, popularity entropy, reuse distance, predictability.

    With two traces, the two side by side: entropy per layer, expert overlap between consecutive tokens
    and within an 8-token window, next-layer recall@k of a first-order Markov predictor, reuse-distance
    percentiles, per-layer LRU and Belady miss rates at a few capacities."""
    if len(paths) > 2:
        raise InputError(f"expected one or two trace files, got {len(paths)}", field="PATH")
    if len(paths) == 2:
        from .traces.compare_stats import print_comparison

        print_comparison(paths[0], paths[1], as_json)
        return
    path = paths[0]
    from .traces.stats import trace_info as info

    if not Path(path).is_file():
        raise InputError("file not found", file=path)
    d = info(path)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=float))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{path}: {d['model']}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("source", str(d["source"]))
    t.add_row("shape", f"{d['num_layers']} MoE layers × {d['num_experts']} experts, top-{d['top_k']}")
    t.add_row("size", f"{d['rows']} rows, {d['requests']} requests, {d['tokens']} tokens "
                      f"({d['prefill_tokens']} prefill, {d['decode_tokens']} decode)")
    for section, fields in d.items():
        if not isinstance(fields, dict):
            continue
        for k, v in fields.items():
            if isinstance(v, list):
                v = " ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v)
            elif isinstance(v, float):
                v = f"{v:.4g}"
            t.add_row(f"{section}.{k}", str(v))
    Console(width=160).print(t)


@main.command()
@_guard
def validate():
    """Check this build against closed-form timings and reference cache simulators."""
    from rich.console import Console
    from rich.table import Table

    from .validate import checks

    rows = checks()
    t = Table(title="moesim validate")
    for c in ("check", "expected", "got", "ok"):
        t.add_column(c)
    for name, exp, got, ok in rows:
        t.add_row(name, exp, got, "[green]yes[/]" if ok else "[red]NO[/]")
    Console(width=140).print(t)
    failed = sum(not r[3] for r in rows)
    click.echo(f"{len(rows) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def _register_subcommands() -> None:
    from .calibrate_cli import calibrate, runtime
    from .hardware.profile_cli import compare, profile, replay
    from .predictors.neural.cli import predictor
    from .report.cli import report
    from .sweep.cli import sweep
    from .traces.cli_extra import collect, fit, import_, train_tiny

    main.add_command(sweep)
    main.add_command(report)
    main.add_command(predictor)
    main.add_command(runtime)
    for cmd in (profile, replay, compare, calibrate):
        main.add_command(cmd)
    for cmd in (collect, train_tiny, import_, fit):
        trace.add_command(cmd)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
