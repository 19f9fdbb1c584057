"""Click commands for `moesim trace`: `collect`, `train-tiny` and `import`.

Register them on the trace group with `trace.add_command(collect)`, `trace.add_command(train_tiny)`
and `trace.add_command(import_)`. torch/transformers are imported only when a command runs.
"""
from __future__ import annotations

import json
import sys

import click

from ..cliutil import guard as _guard
from ..errors import InputError


# ---- collect ----------------------------------------------------------------------------------------

@click.command("collect")
@click.option("--model", "model_id", required=True, metavar="ID_OR_PATH",
              help="transformers model: hub id or local directory")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False),
              help="one prompt per line, or .jsonl with 'prompt'/'text' strings or 'input_ids' lists")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="greedy decode steps per prompt (each generated token is fed back and recorded)")
@click.option("--pre-attn", is_flag=True, help="also record each MoE block's input-layernorm output (float16)")
@click.option("--scores", type=click.Choice(["weights", "logits", "none"]), default="weights", show_default=True,
              help="scores column: the experts' gate weights, all router logits, or none")
@click.option("--stack", type=click.Choice(["decoder", "encoder"]), default=None,
              help="encoder-decoder models (Switch): which stack's MoE layers to record [default: decoder]")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
@click.option("--max-prompt-tokens", type=int, default=None, help="truncate prompts to this many tokens")
@click.option("--num-prompts", type=int, default=None, help="use only the first N prompts")
@click.option("--stop-at-eos", is_flag=True, help="end a request at the EOS token (default: always decode N)")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--name", default=None, help="model name written to the trace metadata")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@_guard
def collect(model_id, prompts, max_new_tokens, pre_attn, scores, stack, device, dtype, max_prompt_tokens, num_prompts,
            stop_at_eos, trust_remote_code, name, output):
    """Record the routing of a transformers MoE model (prefill + greedy decode) as a trace."""
    from .collect import collect_to_file

    def progress(i, n):
        click.echo(f"  request {i + 1}/{n}", err=True)

    path, info = collect_to_file(model_id, prompts, output, max_new_tokens, pre_attn=pre_attn, scores=scores,
                                 stack=stack, device=device, dtype=dtype, max_prompt_tokens=max_prompt_tokens,
                                 num_prompts=num_prompts, stop_at_eos=stop_at_eos,
                                 trust_remote_code=trust_remote_code, name=name, progress=progress)
    click.echo(f"wrote {path} ({info.family.name}: {info.num_layers} MoE layers x {info.num_experts} experts, "
               f"top-{info.top_k})")
    if info.dropped_tokens:
        click.echo(f"note: {info.dropped_tokens} token-layer routings went over an expert's capacity (the model "
                   f"skipped that expert); the trace records the router's choice", err=True)


# ---- train-tiny ---------------------------------------------------------------------------------------

@click.command("train-tiny")
@click.option("-o", "--output", default="traces/tiny-learned.parquet", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="training steps [default: 1000]")
@click.option("--layers", type=int, default=None, help="[default: 4]")
@click.option("--experts", type=int, default=None, help="[default: 32]")
@click.option("--top-k", type=int, default=None, help="[default: 2]")
@click.option("--hidden", type=int, default=None, help="[default: 128]")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: 1]")
@click.option("--requests", type=int, default=None, help="held-out prompts to collect [default: 16]")
@click.option("--prompt-len", type=int, default=None, help="[default: 64 bytes]")
@click.option("--decode-len", type=int, default=None, help="[default: 64]")
@click.option("--max-minutes", type=float, default=None, help="stop training early after this long (not reproducible)")
@click.option("--save-model", type=click.Path(file_okay=False), default=None,
              help="also save the trained model (save_pretrained) here")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="write the recipe, loss curve and timings here")
@_guard
def train_tiny(output, seed, steps, layers, experts, top_k, hidden, threads, requests, prompt_len, decode_len,
               max_minutes, save_model, json_out):
    """Train a tiny MoE LM on the stdlib's source (CPU, seeded) and collect its learned routing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise InputError(f"needs torch and transformers: {e}") from None
    from .tiny import TinyRecipe, train_tiny as run

    r = TinyRecipe(seed=seed)
    for k, v in dict(steps=steps, layers=layers, experts=experts, top_k=top_k, hidden=hidden, threads=threads,
                     requests=requests, prompt_len=prompt_len, decode_len=decode_len).items():
        if v is not None:
            setattr(r, k, v)
    res = run(output, r, max_minutes=max_minutes, save_model=save_model, log=lambda s: click.echo(s))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res.to_dict(), f, indent=2)
        click.echo(f"wrote {json_out}")


# ---- import -------------------------------------------------------------------------------------------

@click.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["csv", "jsonl", "numpy", "policylang", "llamacpp"]))
@click.option("--model", "preset", default=None, help="model preset giving num_layers, num_experts, top_k")
@click.option("--num-layers", type=int, default=None, help="MoE layers (overrides the preset)")
@click.option("--num-experts", type=int, default=None, help="routed experts per layer (overrides the preset)")
@click.option("--top-k", type=int, default=None, help="experts per token (overrides the preset)")
@click.option("--prompt-len", default=None, metavar="N|all",
              help="tokens < N are prefill, when the input has no phase (required for numpy)")
@click.option("--first-layer", type=int, default=None,
              help="layer id of the first MoE layer in the input [default: 0; llamacpp: the smallest seen]")
@click.option("--name", default=None, help="model name for the trace metadata [default: the preset or file name]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@_guard
def import_(path, fmt, preset, num_layers, num_experts, top_k, prompt_len, first_layer, name, output):
    """Convert another tool's routing trace (CSV/JSONL, NumPy, moe-policylang, llama.cpp log) to a moesim trace."""
    from .importers import import_trace, resolve_shape

    shape, preset_name = resolve_shape(preset, num_layers, num_experts, top_k)
    out, meta = import_trace(path, fmt, output, shape, model_name=name or preset_name, prompt_len=prompt_len,
                             first_layer=first_layer)
    click.echo(f"wrote {out} ({meta.num_layers} MoE layers x {meta.num_experts} experts, top-{meta.top_k})")


@click.group()
def _standalone():
    """The commands of this module on their own (for tests and `python -m`)."""


_standalone.add_command(collect)
_standalone.add_command(train_tiny)
_standalone.add_command(import_)
