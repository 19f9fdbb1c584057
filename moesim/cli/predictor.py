"""`moesim predictor train | eval | presets` — the learned predictors' command line.

    moesim predictor train speculation --trace T [--preset small] -o spec.pt
    moesim predictor train pre_attention --trace T --preset tiny -o pre.pt
    moesim predictor train speculation --trace T -o spec.pt --resume spec.pt --epochs 40
    moesim predictor eval spec.pt [--trace T] [--split test|val|all] [--json] [-o report.json]
    moesim predictor presets [--layers 16 --experts 64 --top-k 8 --input-dim 2048]

Torch is imported inside the commands only. Bad input: one line naming file and field, exit 2.
"""
from __future__ import annotations

import json

import click

from moesim.cli.util import guard as _guard
from moesim.errors import InputError
from moesim.yamlsafe import safe_load


def _overrides(items) -> tuple[dict, dict]:
    import yaml

    model, train = {}, {}
    for item in items:
        if "=" not in item:
            raise InputError(f"expected model.KEY=VALUE or train.KEY=VALUE, got {item!r}", field="--set")
        key, raw = item.split("=", 1)
        section, _, name = key.strip().partition(".")
        if section not in ("model", "train") or not name:
            raise InputError(f"expected model.KEY=VALUE or train.KEY=VALUE, got {item!r}", field="--set")
        try:
            value = safe_load(raw)
        except yaml.YAMLError:
            value = raw
        (model if section == "model" else train)[name] = value
    return model, train


@click.group("predictor")
def predictor():
    """Train and evaluate the learned expert predictors (speculation, pre_attention; needs PyTorch)."""


@predictor.command("train")
@click.argument("kind", type=click.Choice(["speculation", "pre_attention"]))
@click.option("--trace", required=True, type=click.Path(dir_okay=False), help="Parquet trace to train on")
@click.option("--preset", help="model/training preset (see `moesim predictor presets`; default: small)")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="checkpoint to write")
@click.option("--resume", type=click.Path(dir_okay=False), help="continue from this checkpoint (same trace)")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--seed", type=int, help="seeds the request split, initial weights, dropout and batch order (default 0)")
@click.option("--context", "context_length", type=int, help="speculation: context layers (seed: 3)")
@click.option("--horizon", type=int, help="speculation: predict offsets 1..horizon (seed: 2)")
@click.option("--arch", type=click.Choice(["1", "2"]), help="pre_attention: architecture 1 or 2")
@click.option("--loss", help="speculation: ce|bce; pre_attention: mse|wbce|focal|ranking")
@click.option("--hidden", type=int, help="pre_attention: hidden width (seed: 2048)")
@click.option("--test-fraction", type=float, help="share of requests held out for eval (default 0.2)")
@click.option("--val-fraction", type=float, help="share of requests for validation (default 0.1)")
@click.option("--max-train-samples", type=int, help="random subset of training samples per epoch")
@click.option("--time-limit", type=float, help="stop after this many seconds (resumable)")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1, ...)")
@click.option("--threads", type=int, help="torch CPU threads")
@click.option("--set", "sets", multiple=True, metavar="model.KEY=VALUE|train.KEY=VALUE",
              help="any other model or training setting, e.g. model.dropout=0.2 train.weight_decay=0.05")
@click.option("--no-train-state", is_flag=True, help="leave the resume state out (smaller file)")
@click.option("--quiet", is_flag=True, help="no progress bar or per-epoch lines")
@_guard
def train_cmd(kind, trace, preset, output, resume, epochs, batch_size, lr, seed, context_length, horizon, arch,
              loss, hidden, test_fraction, val_fraction, max_train_samples, time_limit, device, threads, sets,
              no_train_state, quiet):
    """Train a KIND predictor on a trace; writes the checkpoint after every epoch."""
    from moesim.predictors.neural.checkpoint import require_torch

    torch = require_torch()
    if threads:
        torch.set_num_threads(threads)
    model_o, train_o = _overrides(sets)
    for k, v in (("context_length", context_length), ("horizon", horizon), ("loss", loss), ("hidden", hidden),
                 ("arch", int(arch) if arch else None)):
        if v is not None:
            model_o[k] = v
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("seed", seed),
                 ("test_fraction", test_fraction), ("val_fraction", val_fraction),
                 ("max_train_samples", max_train_samples)):
        if v is not None:
            train_o[k] = v
    if resume and (model_o or set(train_o) - {"epochs"}):
        raise InputError("with --resume only --epochs may change (the rest comes from the checkpoint)",
                         field="--resume")
    from moesim.predictors.neural.training import train

    ck = train(kind, trace, preset=preset, model_overrides=model_o, train_overrides=train_o, output=output,
               resume=resume, device=device, progress=not quiet, time_limit_s=time_limit,
               keep_train_state=not no_train_state, log=(lambda s: None) if quiet else click.echo)
    lat = ck["latency"]
    click.echo(f"wrote {output}: {ck['kind']} ({ck['preset']}, {ck['parameters']:,} parameters), "
               f"best val P@K {ck['val_score']:.4f} at epoch {ck['best_epoch']}, stopped: {ck['stopped']}, "
               f"{ck['train_seconds']:.1f} s")
    if lat:
        click.echo(f"forward latency ({lat['device']}): " +
                   ", ".join(f"{n} tok {us:.0f} µs" for n, us in zip(lat["tokens"], lat["us"])))
    click.echo(f"evaluate: moesim predictor eval {output}")


@predictor.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--trace", type=click.Path(dir_okay=False), help="default: the trace it was trained on")
@click.option("--split", type=click.Choice(["test", "val", "all"]),
              help="default: test on the training trace, all on another")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, help="torch CPU threads")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="also write the JSON report here")
@click.option("--no-latency", is_flag=True, help="skip measuring the forward time on this machine")
@_guard
def eval_cmd(checkpoint, trace, split, device, threads, as_json, output, no_latency):
    """Evaluate CHECKPOINT on held-out requests beside random, frequency, recency, Markov and Bayes."""
    from moesim.predictors.neural.checkpoint import require_torch

    torch = require_torch()
    if threads:
        torch.set_num_threads(threads)
    from moesim.cli.render import format_evaluation
    from moesim.predictors.neural.evaluation import evaluate

    r = evaluate(checkpoint, trace, split, device, measure=not no_latency)
    if output:
        from pathlib import Path

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(r, indent=2, default=float))
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
    else:
        click.echo(format_evaluation(r), nl=False)


@predictor.command("presets")
@click.option("--layers", type=int, default=16, show_default=True)
@click.option("--experts", type=int, default=64, show_default=True)
@click.option("--top-k", type=int, default=8, show_default=True)
@click.option("--input-dim", type=int, default=2048, show_default=True, help="pre_attn width")
@_guard
def presets_cmd(layers, experts, top_k, input_dim):
    """The presets and their parameter counts for a model shape."""
    from moesim.predictors.neural.checkpoint import require_torch

    require_torch()
    from moesim.predictors.neural.evaluation import parameter_counts

    for row in parameter_counts({"num_layers": layers, "num_experts": experts, "top_k": top_k,
                                 "input_dim": input_dim}):
        m = ", ".join(f"{k}={v}" for k, v in row["model"].items())
        t = ", ".join(f"{k}={v}" for k, v in row["train"].items())
        click.echo(f"{row['kind']:14s} {row['preset']:9s} {row['parameters']:>12,d}  {m}; {t}")
