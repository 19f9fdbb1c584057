"""Checkpoint files: one `torch.save`d dict of plain types and tensors (loaded with
`weights_only=True`), written atomically (temporary file + rename).

Keys: format, version, kind, preset, model_config, train_config, model_state (the best weights by
validation score), parameters, trace (path, sha256, metadata, size), split (request ids of
train / val / test), val_metrics, best_epoch, history, latency (forward time measured when
training ended: device, threads, tokens per call -> µs), complete, stopped, train_seconds,
train_state (last weights, optimiser, schedulers, RNG states, counters: what `--resume` needs;
None when stripped), versions.
"""
from __future__ import annotations

import os
import uuid
import warnings
import zipfile
from pathlib import Path

from ...errors import InputError

FORMAT = "moesim-predictor"
VERSION = 1


def require_torch():
    try:
        import torch
    except ImportError:
        raise InputError("the neural predictors need PyTorch, which is not installed "
                         "(pip install 'moesim[torch]')", field="torch") from None
    return torch


def save(ckpt: dict, path) -> Path:
    torch = require_torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path, kind: str | None = None, field: str | None = None) -> dict:
    """Load and check a checkpoint; `kind` ("speculation" / "pre_attention") must match if given."""
    torch = require_torch()
    p = Path(path)
    if not p.is_file():
        raise InputError("checkpoint file not found", file=str(p), field=field)
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive
        raise InputError("not a readable checkpoint: not a torch.save archive (truncated, or another kind of file)",
                         file=str(p), field=field)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore")
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text asks users to file issues with torch: not ours to show
        raise InputError(f"not a readable checkpoint: a damaged archive or objects other than tensors and plain "
                         f"types ({type(e).__name__})", file=str(p), field=field) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise InputError("not a moesim predictor checkpoint", file=str(p), field=field)
    if ck.get("version") != VERSION:
        raise InputError(f"checkpoint format version {ck.get('version')} (this moesim reads {VERSION})",
                         file=str(p), field=field)
    if kind is not None and ck.get("kind") != kind:
        raise InputError(f"is a {ck.get('kind')} checkpoint, not {kind}", file=str(p), field=field)
    return ck


def check_model(ck: dict, model, file: str, field: str | None = "predictor.checkpoint") -> None:
    """The checkpoint's shape must be the scenario model's (layers, experts, top_k)."""
    mc = ck["model_config"]
    want = (model.num_layers, model.num_experts, model.top_k)
    have = (mc["num_layers"], mc["num_experts"], mc["top_k"])
    if want != have:
        tm = ck.get("trace", {}).get("meta", {})
        raise InputError(
            f"trained for {have[0]} MoE layers x {have[1]} experts, top-{have[2]} "
            f"(trace model {tm.get('model', '?')!r}), but the scenario model {model.name!r} has "
            f"{want[0]} x {want[1]}, top-{want[2]}", file=file, field=field)
