"""Click commands for `moesim trace`: `collect`, `train-tiny`, `import` and `fit`.

Register them on the trace group with `trace.add_command(collect)`, `trace.add_command(train_tiny)`,
`trace.add_command(import_)` and `trace.add_command(fit)`. torch/transformers are imported only when a command runs.
"""
from __future__ import annotations

import json

import click

from moesim.cli.util import guard as _guard
from moesim.errors import InputError


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
    from moesim.routing.collect import collect_to_file

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
@click.option("--requests", type=int, default=None, help="held-out prompts to collect [default: 40]")
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
    from moesim.routing.tiny import TinyRecipe, train_tiny as run

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
    from moesim.routing.importers import import_trace, resolve_shape

    shape, preset_name = resolve_shape(preset, num_layers, num_experts, top_k)
    out, meta = import_trace(path, fmt, output, shape, model_name=name or preset_name, prompt_len=prompt_len,
                             first_layer=first_layer)
    click.echo(f"wrote {out} ({meta.num_layers} MoE layers x {meta.num_experts} experts, top-{meta.top_k})")


# ---- fit ----------------------------------------------------------------------------------------------

def fit_table(res, title: str):
    """A rich Table: statistic / held-out real / fitted synthetic / relative error / ...."""
    from rich.table import Table

    from moesim.traces.compare_stats import label

    def f(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    t = Table(title=title)
    for c in ("statistic", "held-out real", "fitted synthetic", "rel. error", "<= 10%", "real: train vs held-out",
              "in-sample rel. error"):
        t.add_column(c, justify="left" if c == "statistic" else "right")
    for row in res.rows():
        e = row["rel_err"]
        ok = "-" if e is None else ("[green]yes[/]" if e <= 0.10 else "[red]no[/]")
        t.add_row(label(row["statistic"]), f(row["heldout_real"]), f(row["synthetic"]),
                  "-" if e is None else f"{100 * e:.1f}%", ok,
                  "-" if row["real_split_diff"] is None else f"{100 * row['real_split_diff']:.1f}%",
                  "-" if row["train_rel_err"] is None else f"{100 * row['train_rel_err']:.1f}%")
    return t


@click.command("fit")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="preset YAML to write")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the request split and every draw")
@click.option("--holdout", type=float, default=0.5, show_default=True, help="share of requests held out")
@click.option("--split", type=click.Choice(["random", "stratified"]), default="stratified", show_default=True,
              help="random: a seeded permutation; stratified: requests sorted by their locality, one of each block "
                   "of 1/holdout held out (halves with alike mixes, less split noise)")
@click.option("--replicates", type=int, default=None,
              help="synthetic traces averaged per evaluation while fitting [default: 4-16, more for small traces]")
@click.option("--eval-replicates", type=int, default=16, show_default=True,
              help="synthetic traces averaged for the held-out check")
@click.option("--max-evals", type=int, default=70, show_default=True,
              help="evaluations of the simulated statistics (doubled when the phase knobs are fitted: a trace with "
                   "prompts and decodes)")
@click.option("--hidden-dim", type=int, default=None,
              help="fix hidden_dim [default: fitted to pre_attn's effective dimension, else 32]")
@click.option("--gate-affinity", type=float, default=None,
              help="fix gate_affinity [default: fitted when the trace has pre_attn, else 0.8]")
@click.option("--attention-noise", type=float, default=None,
              help="fix attention_noise [default: fitted when the trace has pre_attn, else 0.5]")
@click.option("--tau-spread", type=float, default=None,
              help="fix tau_spread (per-request locality spread) [default: fitted]")
@click.option("--no-profile", is_flag=True, help="Zipf skew only: no per-rank popularity correction (rank_bias)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="also write the held-out comparison and the fit's history as JSON")
@click.option("--quiet", is_flag=True, help="no progress, no table")
@_guard
def fit(path, output, seed, holdout, split, replicates, eval_replicates, max_evals, hidden_dim, gate_affinity,
        attention_noise, tau_spread, no_profile, json_out, quiet):
    """Fit the synthetic latent-gate generator to a trace; write the preset YAML and check it on held-out requests."""
    from rich.console import Console

    from moesim.traces.fit import fit_trace, write_preset

    if not 0 < holdout < 1:
        raise InputError(f"must be between 0 and 1 (got {holdout})", field="--holdout")
    if hidden_dim is not None and not 2 <= hidden_dim <= 1024:
        raise InputError(f"must be between 2 and 1024 (got {hidden_dim})", field="--hidden-dim")
    if gate_affinity is not None and not 0 <= gate_affinity <= 1:
        raise InputError(f"must be between 0 and 1 (got {gate_affinity})", field="--gate-affinity")
    if attention_noise is not None and attention_noise < 0:
        raise InputError(f"must be >= 0 (got {attention_noise})", field="--attention-noise")
    if tau_spread is not None and not 0 <= tau_spread <= 10:
        raise InputError(f"must be between 0 and 10 (got {tau_spread})", field="--tau-spread")
    if max_evals < 5:
        raise InputError(f"must be >= 5 (got {max_evals})", field="--max-evals")
    res = fit_trace(path, seed=seed, holdout=holdout, split=split, replicates=replicates, eval_replicates=eval_replicates,
                    max_evals=max_evals, hidden_dim=hidden_dim, gate_affinity=gate_affinity,
                    attention_noise=attention_noise, tau_spread=tau_spread, profile=not no_profile,
                    log=None if quiet else (lambda s: click.echo(s, err=True)))
    out = write_preset(res, output)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"preset": res.to_document(), "rows": res.rows(), "history": res.history,
                       "seconds": round(res.seconds, 2)}, f, indent=2, default=float)
    if not quiet:
        n_ok = sum(1 for r in res.rows() if r["rel_err"] is not None and r["rel_err"] <= 0.10)
        n = sum(1 for r in res.rows() if r["rel_err"] is not None)
        Console(width=160).print(fit_table(
            res, f"{path}: {len(res.heldout_ids)} held-out requests vs {res.eval_replicates} synthetic traces of "
                 f"the same lengths ({n_ok}/{n} within 10%)"))
        click.echo(f"params: {res.params.describe()}")
    click.echo(f"wrote {out} ({res.evaluations} evaluations, {res.seconds:.1f} s)")


@click.group()
def _standalone():
    """The commands of this module on their own (for tests and `python -m`)."""


_standalone.add_command(collect)
_standalone.add_command(train_tiny)
_standalone.add_command(import_)
_standalone.add_command(fit)
