"""`moesim trace`: generate and inspect routing traces; `collect`, `import`, `fit` and
`train-tiny` come from `trace_sources`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from moesim.cli.util import guard as _guard
from moesim.errors import InputError


# ---- traces ------------------------------------------------------------------------------------

@click.group()
def trace():
    """Generate and inspect routing traces (Parquet)."""


@trace.command("generate")
@click.option("--preset", default=None,
              help="model preset (the synthetic routing preset of the same name), or a routing preset fitted "
                   "to a published statistic (mixtral-8x7b-published); with --preset-file, the model whose "
                   "shape the trace takes [default: the file's model]")
@click.option("--preset-file", type=click.Path(dir_okay=False), default=None,
              help="a fitted preset YAML (`moesim trace fit`): generate with its parameters; --requests, "
                   "--prompt-len and --decode-len default to the fitted trace's")
@click.option("--requests", "n_requests", type=int, default=8, show_default=True)
@click.option("--prompt-len", type=int, default=32, show_default=True)
@click.option("--decode-len", type=int, default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
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

    from moesim.models import get_preset, preset_names
    from moesim.traces.synthetic import generate_to_file

    params = label = None
    if preset_file is not None:
        from moesim.traces.fit import spec_for_preset_file

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
        from moesim.traces.synthetic import PRESET_MODELS

        try:
            spec = get_preset(PRESET_MODELS.get(preset, preset))
        except KeyError:
            known = ", ".join(preset_names() + sorted(PRESET_MODELS))
            raise InputError(f"unknown preset {preset!r} (known: {known})", field="--preset")
        label = preset
    for name, v in (("--requests", n_requests), ("--prompt-len", prompt_len)):
        if v <= 0:
            raise InputError(f"must be > 0 (got {v})", field=name)
    if decode_len < 0:
        raise InputError(f"must be >= 0 (got {decode_len})", field="--decode-len")
    from moesim.outdir import check_writable_file

    check_writable_file(output)
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
        from moesim.traces.compare_stats import comparison

        d = comparison(paths[0], paths[1])
        if as_json:
            click.echo(json.dumps(d, indent=2, default=float))
        else:
            from moesim.cli.render import print_trace_comparison

            print_trace_comparison(d, paths[0], paths[1])
        return
    path = paths[0]
    from moesim.traces.stats import trace_info as info

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
