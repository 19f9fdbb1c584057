"""Training of both learned predictors (torch, imported lazily by the CLI and the tests).

Every random draw is seeded from `TrainConfig.seed`: the request split (numpy Generator), the
initial weights and dropout (`torch.manual_seed`), the batch order and sample subsets (a dedicated
`torch.Generator`). On CPU the same seed gives the same weights and metrics. A checkpoint is
written after every epoch (best weights by validation score + the state `--resume` needs); a
resumed run continues exactly where the saved one stopped (epoch boundaries and time-limit stops
alike), so resuming gives the weights an uninterrupted run would have.

Optimiser AdamW, optional linear warm-up, ReduceLROnPlateau on the validation score (mode max),
gradient-norm clipping, early stopping, best-checkpoint saving (seed 000 §3.3 / §5.2.2).
The validation score is P@K on the validation requests (top-1 accuracy for top-1 models).
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .config import PreAttentionConfig, SpeculationConfig, model_config_from_dict
from .data import PreSamples, SpecSamples
from .models import build_model

LATENCY_TOKENS = (1, 4, 16, 64, 256)


# ---- tensors of samples ----------------------------------------------------------------------------

def spec_tensors(s: SpecSamples) -> dict:
    return {"ctx_e": torch.from_numpy(s.ctx_e), "ctx_l": torch.from_numpy(s.ctx_l),
            "ctx_t": torch.from_numpy(s.ctx_t), "ctx_mask": torch.from_numpy(s.ctx_mask),
            "tgt_l": torch.from_numpy(s.tgt_l), "tgt_e": torch.from_numpy(s.tgt_e),
            "tgt_mask": torch.from_numpy(s.tgt_mask)}


def pre_tensors(s: PreSamples) -> dict:
    d = {"x": torch.from_numpy(s.x.astype(np.float32)), "layer": torch.from_numpy(s.layer),
         "tgt_e": torch.from_numpy(s.tgt_e)}
    if s.scores is not None:
        d["scores"] = torch.from_numpy(s.scores.astype(np.float32))
    return d


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def spec_predict(model, t: dict, device="cpu", batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, H, E] and confidence [N, H] (float32 numpy) for speculation samples."""
    model.eval()
    N = t["ctx_e"].shape[0]
    outs, confs = [], []
    for i in range(0, N, batch_size):
        b = _to({k: v[i:i + batch_size] for k, v in t.items() if k.startswith("ctx") or k == "tgt_l"}, device)
        lg, cf = model(b["ctx_e"], b["ctx_l"], b["ctx_t"], b["ctx_mask"], b["tgt_l"])
        outs.append(lg.float().cpu())
        confs.append(cf.float().cpu())
    E = model.cfg.num_experts
    H = t["tgt_l"].shape[1]
    if not outs:
        return np.zeros((0, H, E), np.float32), np.zeros((0, H), np.float32)
    return torch.cat(outs).numpy(), torch.cat(confs).numpy()


@torch.no_grad()
def pre_predict(model, t: dict, device="cpu", batch_size: int = 8192) -> np.ndarray:
    """Scores [N, E] for pre-attention samples (each sample through its own layer's router)."""
    model.eval()
    N = t["x"].shape[0]
    out = torch.zeros(N, model.cfg.num_experts)
    layer = t["layer"]
    for l in torch.unique(layer).tolist():
        idx = torch.nonzero(layer == l).squeeze(1)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            out[j] = model(t["x"][j].to(device), l).float().cpu()
    return out.numpy()


def _p_at_k(scores: np.ndarray, sets: np.ndarray) -> float:
    """Mean share of the routed set among the K best scores (top-1 accuracy when K = 1)."""
    if scores.shape[0] == 0:
        return 0.0
    K = sets.shape[1]
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    return float((top[:, :, None] == sets[:, None, :]).any(axis=2).sum(axis=1).mean() / K)


def validation_score(model, kind: str, t: dict, device) -> float:
    if kind == "speculation":
        lg, _ = spec_predict(model, t, device)
        m = t["tgt_mask"].numpy()
        return _p_at_k(lg[m], t["tgt_e"].numpy()[m])
    return _p_at_k(pre_predict(model, t, device), t["tgt_e"].numpy())


# ---- latency ----------------------------------------------------------------------------------------

def device_description(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} torch threads"


@torch.no_grad()
def measure_latency(model, device="cpu", tokens=LATENCY_TOKENS, repeats: int = 30, seed: int = 0) -> dict:
    """Median wall time of one batched forward (one hook call of the simulator predictor) per
    number of tokens, in microseconds, on `device`, in eval mode under torch.no_grad."""
    model.eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    us = []
    for n in tokens:
        if isinstance(cfg, SpeculationConfig):
            K, H, L, E = cfg.top_k, cfg.horizon, cfg.num_layers, cfg.num_experts
            C = cfg.context_length + cfg.prev_tokens * (cfg.context_length + cfg.horizon)   # slots
            args = (torch.randint(0, E, (n, C, K), generator=g).to(dev),
                    torch.randint(0, L, (n, C), generator=g).to(dev),
                    torch.randint(0, 512, (n, C), generator=g).to(dev),
                    torch.ones(n, C, dtype=torch.bool).to(dev),
                    torch.randint(0, L, (n, H), generator=g).to(dev))

            def fwd(args=args):
                return model(*args)
        else:
            x = torch.randn(n, cfg.input_dim, generator=g).to(dev)

            def fwd(x=x):
                return model(x, 0)
        for _ in range(3):
            fwd()
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fwd()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        us.append(float(np.median(times) * 1e6))
    return {"device": device_description(device), "tokens": list(tokens), "us": us,
            "torch": str(torch.__version__), "measured": time.strftime("%Y-%m-%d")}


def latency_at(lat: dict, tokens: float) -> float:
    """Interpolate a stored latency table at `tokens` tokens per call (clamped at its ends)."""
    return float(np.interp(tokens, lat["tokens"], lat["us"]))


# ---- training ---------------------------------------------------------------------------------------

def train(kind: str, trace, *, preset: str | None = None, model_overrides: dict | None = None,
          train_overrides: dict | None = None, output=None, resume=None, device: str = "cpu",
          progress: bool = True, time_limit_s: float | None = None, keep_train_state: bool = True,
          log: Callable[[str], None] | None = None) -> dict:
    """Train a `kind` predictor on `trace`; returns the final checkpoint dict (also written to
    `output` after every epoch when given). `resume`: a checkpoint path to continue from (its
    configuration is used; `train_overrides` may raise `epochs`)."""
    from .trainer import Trainer

    return Trainer(kind, trace, preset=preset, model_overrides=model_overrides, train_overrides=train_overrides,
                   output=output, resume=resume, device=device, progress=progress, time_limit_s=time_limit_s,
                   keep_train_state=keep_train_state, log=log).run()


def load_model(ck: dict, device="cpu"):
    """The model of a checkpoint dict, in eval mode."""
    mc = model_config_from_dict(ck["model_config"])
    m = build_model(mc)
    m.load_state_dict(ck["model_state"])
    return m.to(device).eval()


def strip(path_in, path_out=None) -> Path:
    """Drop the training state (for a small checkpoint to ship)."""
    ck = ckpt_io.load(path_in)
    ck["train_state"] = None
    return ckpt_io.save(ck, path_out or path_in)


def default_threads() -> None:
    """Respect OMP_NUM_THREADS / MOESIM_TORCH_THREADS if set (torch's default otherwise)."""
    n = os.environ.get("MOESIM_TORCH_THREADS")
    if n:
        torch.set_num_threads(int(n))


__all__ = ["train", "load_model", "measure_latency", "latency_at", "spec_predict", "pre_predict",
           "spec_tensors", "pre_tensors", "strip", "PreAttentionConfig", "SpeculationConfig", "Path"]
