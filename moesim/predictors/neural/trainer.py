"""One training run of a learned predictor (`training.train`): its data and configuration, then epochs, each
checkpointed, with the state `--resume` needs (module docstring of `training`)."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from ...errors import InputError
from ...version import __version__
from . import checkpoint as ckpt_io
from .config import TrainConfig, build_configs, model_config_from_dict
from .data import load_trace, pre_attention_samples, select_requests, speculation_samples, split_requests, trace_summary
from .losses import pre_attention_loss, speculation_loss
from .models import build_model, count_parameters
from .training import _to, measure_latency, pre_tensors, spec_tensors, validation_score


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


class Trainer:
    """Train a `kind` predictor on `trace` (arguments as `training.train`)."""

    def __init__(self, kind: str, trace, *, preset: str | None = None, model_overrides: dict | None = None,
                 train_overrides: dict | None = None, output=None, resume=None, device: str = "cpu",
                 progress: bool = True, time_limit_s: float | None = None, keep_train_state: bool = True,
                 log: Callable[[str], None] | None = None):
        self.log = log or (lambda s: None)
        self.t_start = time.perf_counter()
        self.kind, self.trace, self.output, self.preset = kind, trace, output, preset
        self.dev = torch.device(device)
        self.progress, self.keep_train_state = progress, keep_train_state
        self.deadline = None if time_limit_s is None else self.t_start + time_limit_s
        self.prev = self.state = None
        if resume is not None:
            self._resume_configs(resume, train_overrides)
        self._load_data(resume, model_overrides, train_overrides)
        self._samples()
        self._build()
        if self.state is not None:
            self._restore()
        n = count_parameters(self.model)
        self.n_params = n
        self.log(f"{kind} ({self.preset}, {n:,} parameters) on {len(self.train_reqs)} train / "
                 f"{len(self.split['val'])} val requests ({len(self.tr):,} / {len(self.va):,} samples), test requests "
                 f"held out: {self.split['test']}")

    # -- set-up --------------------------------------------------------------------------------------------
    def _resume_configs(self, resume, train_overrides) -> None:
        self.prev = prev = ckpt_io.load(resume, kind=self.kind, field="--resume")
        self.state = prev.get("train_state")
        if self.state is None:
            raise InputError("checkpoint has no training state to resume from (it was saved without it)",
                             file=str(resume), field="--resume")
        self.mc = model_config_from_dict(prev["model_config"])
        self.tc = TrainConfig(**{**prev["train_config"], **(train_overrides or {})})
        self.preset = prev.get("preset")

    def _load_data(self, resume, model_overrides, train_overrides) -> None:
        kind = self.kind
        self.data = data = load_trace(self.trace, pre_attn=(kind == "pre_attention"), scores=(kind == "pre_attention"))
        L, E, K = data.shape
        if resume is not None:
            if data.fingerprint != self.prev["trace"]["fingerprint"]:
                raise InputError("this trace is not the one the checkpoint was trained on (sha256 differs)",
                                 file=str(self.trace), field="--trace")
        else:
            shape = {"num_layers": L, "num_experts": E, "top_k": K}
            if kind == "pre_attention":
                shape["input_dim"] = int(data.requests[0].pre_attn.shape[2])
            self.mc, self.tc = build_configs(kind, shape, self.preset, model_overrides, train_overrides)
        tc = self.tc
        self.split = split_requests([r.request_id for r in data.requests], tc.test_fraction, tc.val_fraction, tc.seed)
        self.train_reqs = select_requests(data, self.split["train"])
        self.val_reqs = select_requests(data, self.split["val"] or self.split["train"])

    def _samples(self) -> None:
        mc, L = self.mc, self.data.shape[0]
        if self.kind == "speculation":
            self.tr = speculation_samples(self.train_reqs, L, mc.context_length, mc.horizon, mc.cross_token,
                                          mc.prev_tokens)
            self.va = speculation_samples(self.val_reqs, L, mc.context_length, mc.horizon, mc.cross_token,
                                          mc.prev_tokens)
            self.tr_t, self.va_t = spec_tensors(self.tr), spec_tensors(self.va)
            self.sizes = len(self.tr)
        else:
            self.tr = pre_attention_samples(self.train_reqs)
            self.va = pre_attention_samples(self.val_reqs)
            self.tr_t, self.va_t = pre_tensors(self.tr), pre_tensors(self.va)
            self.sizes = [torch.nonzero(self.tr_t["layer"] == l).squeeze(1) for l in range(L)]
        if len(self.tr) == 0:
            raise InputError("no training samples in the training requests", file=str(self.trace))

    def _build(self) -> None:
        tc = self.tc
        torch.manual_seed(tc.seed)
        self.model = build_model(self.mc).to(self.dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                     betas=tuple(tc.betas))
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="max", factor=tc.plateau_factor,
                                                                  patience=tc.plateau_patience)
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.epoch, self.step, self.sched_lr = 0, 0, tc.lr
        self.best_score, self.best_epoch, self.bad = -1.0, 0, 0
        self.best_state = None
        self.history: list[dict] = []
        self.elapsed0 = 0.0
        self.batch_pos, self.epoch_gen = 0, None
        self.stopped = "epochs"
        self.fallback_score = -1.0
        self.out_of_time = False

    def _restore(self) -> None:
        state, prev = self.state, self.prev
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.plateau.load_state_dict(state["plateau"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step, self.sched_lr = state["epoch"], state["step"], state["sched_lr"]
        self.best_score, self.best_epoch, self.bad = state["best_score"], state["best_epoch"], state["bad_epochs"]
        self.best_state = prev["model_state"] if self.best_epoch > 0 else None
        self.history = list(prev.get("history", []))
        self.elapsed0 = float(prev.get("train_seconds", 0.0))
        self.batch_pos = state.get("batch_pos", 0)
        self.epoch_gen = state.get("epoch_gen")
        if state.get("finished") and self.epoch >= self.tc.epochs:
            self.log("nothing to do: the checkpoint has finished training (raise --epochs to train on)")

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _train_state(self, finished: bool, epoch_gen_state, pos: int) -> dict | None:
        if not self.keep_train_state:
            return None
        return {"model": copy.deepcopy(self.model.state_dict()), "optimizer": copy.deepcopy(self.opt.state_dict()),
                "plateau": self.plateau.state_dict(), "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "epoch": self.epoch, "step": self.step, "sched_lr": self.sched_lr, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad, "finished": finished,
                "batch_pos": pos, "epoch_gen": epoch_gen_state}

    def snapshot(self, finished: bool, epoch_gen_state=None, pos=0, fallback_state=None) -> dict:
        ts = self._train_state(finished, epoch_gen_state, pos)
        if self.best_state is not None:
            weights = self.best_state
        else:
            weights = fallback_state if fallback_state is not None else self.model.state_dict()
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": self.kind, "preset": self.preset,
            "model_config": self.mc.model_dump(mode="json"), "train_config": self.tc.model_dump(mode="json"),
            "model_state": weights,
            "parameters": self.n_params, "trace": trace_summary(self.data),
            "split": {**self.split, "seed": self.tc.seed},
            "val_score": self.best_score if fallback_state is None else self.fallback_score,
            "best_epoch": self.best_epoch, "history": self.history,
            "latency": None, "complete": finished, "stopped": self.stopped,
            "train_seconds": self.elapsed0 + time.perf_counter() - self.t_start, "train_state": ts,
            "versions": {"moesim": __version__, "torch": str(torch.__version__)},
        }

    def _save(self, ck: dict) -> None:
        if self.output is not None:
            ckpt_io.save(ck, self.output)

    # -- one optimisation step, one epoch ---------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for g_ in self.opt.param_groups:
            g_["lr"] = lr

    def _warm_lr(self) -> None:
        tc = self.tc
        if tc.warmup_steps and self.step < tc.warmup_steps:
            self._set_lr(self.sched_lr * (self.step + 1) / tc.warmup_steps)

    def _optimise(self, layer, idx) -> float:
        """One step on the batch `idx` (of `layer`, pre-attention); returns its main loss."""
        tc, model = self.tc, self.model
        self._warm_lr()
        b = _to({k: v[idx] for k, v in self.tr_t.items()}, self.dev)
        if self.kind == "speculation":
            lg, cf = model(b["ctx_e"], b["ctx_l"], b["ctx_t"], b["ctx_mask"], b["tgt_l"])
            loss, main = speculation_loss(self.mc, lg, cf, b["tgt_e"], b["tgt_mask"])
        else:
            lg = model(b["x"], layer)
            loss = main = pre_attention_loss(self.mc, lg, b["tgt_e"], b.get("scores"))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        self.opt.step()
        self.step += 1
        if tc.warmup_steps and self.step == tc.warmup_steps:
            self._set_lr(self.sched_lr)
        return float(main.detach())

    def _late(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def _batches(self, batches: list) -> tuple[float, int]:
        """Train on the epoch's batches from `batch_pos`; (summed loss, samples). Sets out_of_time at the deadline."""
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(batches), initial=self.batch_pos, desc=f"epoch {self.epoch + 1}/{self.tc.epochs}",
                       leave=False, dynamic_ncols=True)
        run_loss, run_n = 0.0, 0
        for bi in range(self.batch_pos, len(batches)):
            layer, idx = batches[bi]
            run_loss += self._optimise(layer, idx) * len(idx)
            run_n += len(idx)
            if bar is not None:
                bar.update(1)
                if bi % 20 == 0:
                    bar.set_postfix(loss=f"{run_loss / max(run_n, 1):.4f}", lr=f"{self.opt.param_groups[0]['lr']:.1e}")
            if self._late() and bi + 1 < len(batches):
                self.out_of_time = True
                self.batch_pos = bi + 1
                break
        if bar is not None:
            bar.close()
        return run_loss, run_n

    def _stop_inside_epoch(self, n_batches: int, run_loss: float, run_n: int, epoch_start_gen) -> dict:
        """The time limit struck inside an epoch: checkpoint where it stopped."""
        self.stopped = "time_limit"
        fallback = None
        if self.best_state is None:   # no epoch completed yet: ship the current weights meanwhile
            self.fallback_score = validation_score(self.model, self.kind, self.va_t, self.dev)
            fallback = copy.deepcopy(self.model.state_dict())
        self.history.append({"epoch": self.epoch + 1, "partial": True, "batches": self.batch_pos, "of": n_batches,
                             "train_loss": run_loss / max(run_n, 1)})
        ck = self.snapshot(False, epoch_start_gen, self.batch_pos, fallback)
        self._save(ck)
        self.log(f"time limit reached in epoch {self.epoch + 1} after batch {self.batch_pos}/{n_batches} "
                 "(--resume continues from here)")
        return ck

    def _end_epoch(self, run_loss: float, run_n: int) -> None:
        """Validation, the plateau scheduler (which sees the un-warmed LR), best weights, the checkpoint."""
        tc = self.tc
        self.batch_pos = 0
        self.epoch += 1
        score = validation_score(self.model, self.kind, self.va_t, self.dev)
        self._set_lr(self.sched_lr)
        self.plateau.step(score)
        self.sched_lr = self.opt.param_groups[0]["lr"]
        self._warm_lr()
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad = score, self.epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad += 1
        self.history.append({"epoch": self.epoch, "train_loss": run_loss / max(run_n, 1), "val_score": score,
                             "lr": self.sched_lr,
                             "seconds": round(self.elapsed0 + time.perf_counter() - self.t_start, 2)})
        self.log(f"epoch {self.epoch}: train loss {run_loss / max(run_n, 1):.4f}, val P@K {score:.4f}"
                 f"{' (best)' if self.best_epoch == self.epoch else ''}, lr {self.sched_lr:.2e}")
        if self.bad >= tc.early_stop_patience:
            self.stopped = "early_stop"
        if self.output is not None:
            ckpt_io.save(self.snapshot(self.epoch >= tc.epochs or self.bad >= tc.early_stop_patience), self.output)

    def _epoch(self) -> dict | None:
        """One epoch (or its rest, when resuming); a checkpoint dict when the time limit stopped training."""
        if self._late() and self.best_state is not None:
            self.out_of_time, self.stopped = True, "time_limit"
            self.log(f"time limit reached after epoch {self.epoch} (--resume continues from here)")
            return self.snapshot(False, self.epoch_gen, self.batch_pos)
        if self.epoch_gen is not None:          # resuming inside an epoch: replay its batch order
            self.gen.set_state(self.epoch_gen)
        epoch_start_gen = self.gen.get_state()
        batches = _epoch_batches(self.kind, self.sizes, self.tc, self.gen)
        self.epoch_gen = None
        self.model.train()
        run_loss, run_n = self._batches(batches)
        if self.out_of_time:
            return self._stop_inside_epoch(len(batches), run_loss, run_n, epoch_start_gen)
        self._end_epoch(run_loss, run_n)
        return None

    def run(self) -> dict:
        tc = self.tc
        ck = None
        while self.epoch < tc.epochs and self.bad < tc.early_stop_patience and not self.out_of_time:
            ck = self._epoch()
        if not self.out_of_time:
            ck = self.snapshot(True)
        # the latency of the best model, measured here, on the training device
        best = build_model(self.mc).to(self.dev)
        best.load_state_dict(ck["model_state"])
        ck["latency"] = measure_latency(best, self.dev)
        ck["train_seconds"] = self.elapsed0 + time.perf_counter() - self.t_start
        self._save(ck)
        return ck
