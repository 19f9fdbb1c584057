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

import copy
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ...version import __version__
from ...errors import InputError
from . import checkpoint as ckpt_io
from .config import PreAttentionConfig, SpeculationConfig, TrainConfig, build_configs, model_config_from_dict
from .data import (
    PreSamples,
    SpecSamples,
    load_trace,
    pre_attention_samples,
    select_requests,
    speculation_samples,
    split_requests,
    trace_summary,
)
from .losses import pre_attention_loss, speculation_loss
from .models import build_model, count_parameters

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

def _epoch_batches(kind: str, n_or_layers, tc: TrainConfig, gen: torch.Generator) -> list:
    """The epoch's batches (index tensors; pre-attention: (layer, indices)), in a seeded order."""
    bs = tc.batch_size
    if kind == "speculation":
        n = n_or_layers
        perm = torch.randperm(n, generator=gen)
        if tc.max_train_samples is not None:
            perm = perm[:tc.max_train_samples]
        return [(None, perm[i:i + bs]) for i in range(0, len(perm), bs)]
    per_layer: list[torch.Tensor] = n_or_layers
    total = sum(len(ix) for ix in per_layer)
    keep = 1.0 if tc.max_train_samples is None else min(1.0, tc.max_train_samples / max(total, 1))
    out = []
    for l, ix in enumerate(per_layer):
        perm = ix[torch.randperm(len(ix), generator=gen)]
        if keep < 1.0:
            perm = perm[:max(2, int(round(keep * len(perm))))]
        for i in range(0, len(perm), bs):
            b = perm[i:i + bs]
            if len(b) > 1:  # BatchNorm needs two samples
                out.append((l, b))
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in order]


def train(kind: str, trace, *, preset: str | None = None, model_overrides: dict | None = None,
          train_overrides: dict | None = None, output=None, resume=None, device: str = "cpu",
          progress: bool = True, time_limit_s: float | None = None, keep_train_state: bool = True,
          log: Callable[[str], None] | None = None) -> dict:
    """Train a `kind` predictor on `trace`; returns the final checkpoint dict (also written to
    `output` after every epoch when given). `resume`: a checkpoint path to continue from (its
    configuration is used; `train_overrides` may raise `epochs`)."""
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    dev = torch.device(device)
    state = None
    if resume is not None:
        prev = ckpt_io.load(resume, kind=kind, field="--resume")
        state = prev.get("train_state")
        if state is None:
            raise InputError("checkpoint has no training state to resume from (it was saved without it)",
                             file=str(resume), field="--resume")
        mc = model_config_from_dict(prev["model_config"])
        tc = TrainConfig(**{**prev["train_config"], **(train_overrides or {})})
        preset = prev.get("preset")
    data = load_trace(trace, pre_attn=(kind == "pre_attention"),
                      scores=(kind == "pre_attention"))
    L, E, K = data.shape
    if resume is not None:
        if data.fingerprint != prev["trace"]["fingerprint"]:
            raise InputError("this trace is not the one the checkpoint was trained on (sha256 differs)",
                             file=str(trace), field="--trace")
    else:
        shape = {"num_layers": L, "num_experts": E, "top_k": K}
        if kind == "pre_attention":
            shape["input_dim"] = int(data.requests[0].pre_attn.shape[2])
        mc, tc = build_configs(kind, shape, preset, model_overrides, train_overrides)
    split = split_requests([r.request_id for r in data.requests], tc.test_fraction, tc.val_fraction, tc.seed)
    train_reqs = select_requests(data, split["train"])
    val_reqs = select_requests(data, split["val"] or split["train"])
    if kind == "speculation":
        tr = speculation_samples(train_reqs, L, mc.context_length, mc.horizon, mc.cross_token, mc.prev_tokens)
        va = speculation_samples(val_reqs, L, mc.context_length, mc.horizon, mc.cross_token, mc.prev_tokens)
        tr_t, va_t = spec_tensors(tr), spec_tensors(va)
        sizes = len(tr)
    else:
        tr = pre_attention_samples(train_reqs)
        va = pre_attention_samples(val_reqs)
        tr_t, va_t = pre_tensors(tr), pre_tensors(va)
        sizes = [torch.nonzero(tr_t["layer"] == l).squeeze(1) for l in range(L)]
    if len(tr) == 0:
        raise InputError("no training samples in the training requests", file=str(trace))

    torch.manual_seed(tc.seed)
    model = build_model(mc).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=tc.plateau_factor,
                                                         patience=tc.plateau_patience)
    gen = torch.Generator().manual_seed(tc.seed)
    epoch, step, sched_lr = 0, 0, tc.lr
    best_score, best_epoch, bad = -1.0, 0, 0
    best_state = None
    history: list[dict] = []
    elapsed0 = 0.0
    batch_pos, epoch_gen = 0, None
    stopped = "epochs"
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        plateau.load_state_dict(state["plateau"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        epoch, step, sched_lr = state["epoch"], state["step"], state["sched_lr"]
        best_score, best_epoch, bad = state["best_score"], state["best_epoch"], state["bad_epochs"]
        best_state = prev["model_state"] if best_epoch > 0 else None
        history = list(prev.get("history", []))
        elapsed0 = float(prev.get("train_seconds", 0.0))
        batch_pos = state.get("batch_pos", 0)
        epoch_gen = state.get("epoch_gen")
        if state.get("finished") and epoch >= tc.epochs:
            log("nothing to do: the checkpoint has finished training (raise --epochs to train on)")
    n_params = count_parameters(model)
    log(f"{kind} ({preset}, {n_params:,} parameters) on {len(train_reqs)} train / {len(split['val'])} val "
        f"requests ({len(tr):,} / {len(va):,} samples), test requests held out: {split['test']}")

    def snapshot(finished: bool, epoch_gen_state=None, pos=0, fallback_state=None) -> dict:
        ts = None
        if keep_train_state:
            ts = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                  "plateau": plateau.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                  "epoch": epoch, "step": step, "sched_lr": sched_lr, "best_score": best_score,
                  "best_epoch": best_epoch, "bad_epochs": bad, "finished": finished,
                  "batch_pos": pos, "epoch_gen": epoch_gen_state}
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": kind, "preset": preset,
            "model_config": mc.model_dump(mode="json"), "train_config": tc.model_dump(mode="json"),
            "model_state": best_state if best_state is not None else (fallback_state if fallback_state is not None else model.state_dict()),
            "parameters": n_params, "trace": trace_summary(data), "split": {**split, "seed": tc.seed},
            "val_score": best_score if fallback_state is None else fallback_score,
            "best_epoch": best_epoch, "history": history,
            "latency": None, "complete": finished, "stopped": stopped,
            "train_seconds": elapsed0 + time.perf_counter() - t_start, "train_state": ts,
            "versions": {"moesim": __version__, "torch": str(torch.__version__)},
        }

    deadline = None if time_limit_s is None else t_start + time_limit_s
    fallback_score = -1.0
    out_of_time = False
    while epoch < tc.epochs and bad < tc.early_stop_patience and not out_of_time:
        if deadline is not None and time.perf_counter() > deadline and best_state is not None:
            out_of_time, stopped = True, "time_limit"
            ck = snapshot(False, epoch_gen, batch_pos)
            log(f"time limit reached after epoch {epoch} (--resume continues from here)")
            break
        if epoch_gen is not None:          # resuming inside an epoch: replay its batch order
            gen.set_state(epoch_gen)
        epoch_start_gen = gen.get_state()
        batches = _epoch_batches(kind, sizes, tc, gen)
        epoch_gen = None
        model.train()
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(batches), initial=batch_pos, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       leave=False, dynamic_ncols=True)
        run_loss, run_n = 0.0, 0
        for bi in range(batch_pos, len(batches)):
            layer, idx = batches[bi]
            if tc.warmup_steps and step < tc.warmup_steps:
                for g_ in opt.param_groups:
                    g_["lr"] = sched_lr * (step + 1) / tc.warmup_steps
            if kind == "speculation":
                b = _to({k: v[idx] for k, v in tr_t.items()}, dev)
                lg, cf = model(b["ctx_e"], b["ctx_l"], b["ctx_t"], b["ctx_mask"], b["tgt_l"])
                loss, main = speculation_loss(mc, lg, cf, b["tgt_e"], b["tgt_mask"])
            else:
                b = _to({k: v[idx] for k, v in tr_t.items()}, dev)
                lg = model(b["x"], layer)
                loss = main = pre_attention_loss(mc, lg, b["tgt_e"], b.get("scores"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            step += 1
            if tc.warmup_steps and step == tc.warmup_steps:
                for g_ in opt.param_groups:
                    g_["lr"] = sched_lr
            run_loss += float(main.detach()) * len(idx)
            run_n += len(idx)
            if bar is not None:
                bar.update(1)
                if bi % 20 == 0:
                    bar.set_postfix(loss=f"{run_loss / max(run_n, 1):.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
            if deadline is not None and time.perf_counter() > deadline and bi + 1 < len(batches):
                out_of_time = True
                batch_pos = bi + 1
                break
        if bar is not None:
            bar.close()
        if out_of_time:
            stopped = "time_limit"
            fallback = None
            if best_state is None:   # no epoch completed yet: ship the current weights meanwhile
                fallback_score = validation_score(model, kind, va_t, dev)
                fallback = copy.deepcopy(model.state_dict())
            history.append({"epoch": epoch + 1, "partial": True, "batches": batch_pos, "of": len(batches),
                            "train_loss": run_loss / max(run_n, 1)})
            ck = snapshot(False, epoch_start_gen, batch_pos, fallback)
            if output is not None:
                ckpt_io.save(ck, output)
            log(f"time limit reached in epoch {epoch + 1} after batch {batch_pos}/{len(batches)} "
                "(--resume continues from here)")
            break
        batch_pos = 0
        epoch += 1
        score = validation_score(model, kind, va_t, dev)
        # the plateau scheduler sees the un-warmed LR
        for g_ in opt.param_groups:
            g_["lr"] = sched_lr
        plateau.step(score)
        sched_lr = opt.param_groups[0]["lr"]
        if tc.warmup_steps and step < tc.warmup_steps:
            for g_ in opt.param_groups:
                g_["lr"] = sched_lr * (step + 1) / tc.warmup_steps
        if score > best_score:
            best_score, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        history.append({"epoch": epoch, "train_loss": run_loss / max(run_n, 1), "val_score": score,
                        "lr": sched_lr, "seconds": round(elapsed0 + time.perf_counter() - t_start, 2)})
        log(f"epoch {epoch}: train loss {run_loss / max(run_n, 1):.4f}, val P@K {score:.4f}"
            f"{' (best)' if best_epoch == epoch else ''}, lr {sched_lr:.2e}")
        if bad >= tc.early_stop_patience:
            stopped = "early_stop"
        if output is not None:
            ckpt_io.save(snapshot(epoch >= tc.epochs or bad >= tc.early_stop_patience), output)
    if not out_of_time:
        ck = snapshot(True)
    # the latency of the best model, measured here, on the training device
    best = build_model(mc).to(dev)
    best.load_state_dict(ck["model_state"])
    ck["latency"] = measure_latency(best, dev)
    ck["train_seconds"] = elapsed0 + time.perf_counter() - t_start
    if output is not None:
        ckpt_io.save(ck, output)
    return ck


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
