"""Metrics: counters and per-step × layer rows recorded during a run, and the summary built from
them. Plain Python lists on the hot path; pandas only at the end."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..models import ModelSpec

_CHUNK = 16384
STEP_COLUMNS = ("step", "batch", "phase", "layer", "tokens", "start_s", "gate_s", "end_s", "attention_s",
                "compute_s", "stall_s", "hits", "late_hits", "misses", "unique_experts", "prefetches")


_STEP_TYPES = {"step": "int32", "batch": "int32", "phase": pd.CategoricalDtype(["prefill", "decode"]), "layer": "int16", "tokens": "int32",
               "hits": "int32", "late_hits": "int32", "misses": "int32", "unique_experts": "int32",
               "prefetches": "int32"}


def percentiles(values, scale: float = 1.0) -> dict:
    a = np.asarray(values, dtype=float) * scale
    if a.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


class Recorder:
    """Everything a run measures. The engine bumps the counters directly (they are hot)."""

    def __init__(self, model: ModelSpec):
        self.model = model
        self.hits = self.late_hits = self.misses = self.bypass = 0
        self.pairs = 0
        self.dram_hits = self.dram_misses = 0
        self.gpu_evictions = self.dram_evictions = 0
        self.prefetch_issued = self.prefetch_used = self.prefetch_late = 0
        self.prefetch_wasted = self.prefetch_dropped = 0
        self.predictor_s = 0.0
        L = model.num_layers
        self.pred_made, self.pred_correct, self.pred_needed = [0] * L, [0] * L, [0] * L
        self.compute_s = 0.0       # GPU compute-stream busy time
        self.stall_s = 0.0
        self.output_tokens = self.processed_tokens = 0
        self.rows: list[tuple] = []        # recent step × layer rows ...
        self._chunks: list[pd.DataFrame] = []  # ... compacted every _CHUNK rows (memory ~flat)
        self._req_start: dict[int, float] = {}
        self._req_first: dict[int, float] = {}
        self.requests: list[tuple] = []
        self._req_info: dict[int, tuple] = {}
        self._last_prefetch = 0
        self.steps = 0
        self.final: dict = {}

    def step_start(self, plan, t: float) -> None:
        if plan.phase == "prefill":
            for rid in plan.request_ids.tolist():
                self._req_start[rid] = t
        self._last_prefetch = self.prefetch_issued

    def layer_row(self, plan, layer, t0, t_gate, t_end, attn, busy, stall, hits, late, misses, n_keys) -> None:
        self.hits += hits
        self.late_hits += late
        self.misses += misses
        self.compute_s += attn + busy
        self.stall_s += stall
        pf = self.prefetch_issued - self._last_prefetch
        self._last_prefetch = self.prefetch_issued
        self.rows.append((plan.index, plan.batch, plan.phase, layer, plan.tokens, t0, t_gate, t_end, attn,
                          busy, stall, hits, late, misses, n_keys, pf))
        if len(self.rows) >= _CHUNK:
            self._compact()

    def _compact(self) -> None:
        df = pd.DataFrame.from_records(self.rows, columns=list(STEP_COLUMNS))
        self._chunks.append(df.astype(_STEP_TYPES))
        self.rows = []

    def step_end(self, plan, t_start: float, t_end: float) -> None:
        self.steps += 1
        self.pairs += plan.pairs * self.model.num_layers  # token × expert pairs, all layers
        self.output_tokens += plan.output_tokens
        self.processed_tokens += plan.tokens
        if plan.first_token_requests is not None:
            for rid in plan.first_token_requests.tolist():
                self._req_first[rid] = t_end
        if plan.finished_requests is not None and len(plan.finished_requests):
            for rid in plan.finished_requests.tolist():
                self.requests.append((rid, plan.batch, self._req_start[rid], self._req_first[rid], t_end))

    def finish(self, sim) -> None:
        self.final = {
            "makespan_s": float(sim.env.now),
            "pcie": (sim.pcie.transfers, sim.pcie.bytes, sim.pcie.busy_time, sim.pcie.slots),
            "disk": (sim.disk.transfers, sim.disk.bytes, sim.disk.busy_time, sim.disk.slots),
            "unused_at_end": len(sim.prefetched_unused),
            "events": sim.events_log,
        }

    # ---- tables and summary --------------------------------------------------------------------

    def steps_frame(self) -> pd.DataFrame:
        if self.rows or not self._chunks:
            self._compact()
        if len(self._chunks) > 1:
            self._chunks = [pd.concat(self._chunks, ignore_index=True)]
        return self._chunks[0]

    def requests_frame(self) -> pd.DataFrame:
        df = pd.DataFrame.from_records(self.requests, columns=["request_id", "batch", "start_s",
                                                                "first_token_s", "finish_s"])
        df = df.sort_values("request_id", kind="stable").reset_index(drop=True)
        df["ttft_ms"] = (df["first_token_s"] - df["start_s"]) * 1e3
        df["e2e_ms"] = (df["finish_s"] - df["start_s"]) * 1e3
        return df

    def events_frame(self) -> pd.DataFrame | None:
        ev = self.final.get("events")
        if ev is None:
            return None
        df = pd.DataFrame.from_records(ev, columns=["resource", "key", "priority", "start_s", "end_s"])
        E = self.model.num_experts
        df["layer"] = (df["key"] // E).astype("int16")
        df["expert"] = (df["key"] % E).astype("int16")
        df["kind"] = np.where(df["priority"] == 0, "demand", "prefetch")
        return df.drop(columns=["key", "priority"])

    def summary(self, decode_tokens: dict[int, int]) -> dict:
        """The headline numbers. `decode_tokens` maps request id → decode steps (for TPOT)."""
        f = self.final
        makespan = f["makespan_s"]
        req = self.requests_frame()
        tpot = []
        for rid, first, fin in zip(req["request_id"], req["first_token_s"], req["finish_s"]):
            n = decode_tokens.get(int(rid), 0)
            if n > 0:
                tpot.append((fin - first) / n)
        accesses = self.hits + self.late_hits + self.misses
        p_tr, p_bytes, p_busy, p_slots = f["pcie"]
        d_tr, d_bytes, d_busy, d_slots = f["disk"]
        dram_lookups = self.dram_hits + self.dram_misses
        steps = self.steps_frame()
        dec = steps[steps["phase"] == "decode"]
        return {
            "tokens_per_s": self.output_tokens / makespan if makespan > 0 else None,
            "output_tokens": self.output_tokens,
            "processed_tokens": self.processed_tokens,
            "requests": len(req),
            "steps": self.steps,
            "makespan_s": makespan,
            "ttft_ms": percentiles(req["ttft_ms"]),
            "tpot_ms": percentiles(tpot, 1e3),
            "e2e_ms": percentiles(req["e2e_ms"]),
            "decode_step_ms": percentiles(dec.groupby("step")["end_s"].max() - dec.groupby("step")["start_s"].min(),
                                          1e3) if len(dec) else percentiles([]),
            "accesses": accesses,
            "hits": self.hits,
            "late_hits": self.late_hits,
            "misses": self.misses,
            "bypass_loads": self.bypass,
            "gpu_hit_rate": self.hits / accesses if accesses else None,
            "dram_hit_rate": self.dram_hits / dram_lookups if dram_lookups else None,
            "stall_s": self.stall_s,
            "stall_fraction": self.stall_s / makespan if makespan > 0 else None,
            "compute_s": self.compute_s,
            "gpu_utilization": self.compute_s / makespan if makespan > 0 else None,
            "bytes_pcie": p_bytes,
            "bytes_disk": d_bytes,
            "transfers_pcie": p_tr,
            "transfers_disk": d_tr,
            "pcie_utilization": p_busy / (makespan * p_slots) if makespan > 0 else None,
            "disk_utilization": d_busy / (makespan * d_slots) if makespan > 0 else None,
            "prefetch": {"issued": self.prefetch_issued, "used": self.prefetch_used, "late": self.prefetch_late,
                         "wasted": self.prefetch_wasted, "dropped": self.prefetch_dropped,
                         "unused_at_end": f["unused_at_end"]},
            "token_expert_pairs": self.pairs,
            "dedup_ratio": 1.0 - accesses / self.pairs if self.pairs else 0.0,
            "evictions": {"gpu": self.gpu_evictions, "dram": self.dram_evictions},
            "predictor_s": self.predictor_s,
            "prediction": self.prediction_quality(),
        }

    def prediction_quality(self) -> dict:
        """Precision = correct / predicted, recall = correct / needed, over every (step, layer)
        target; a prediction counts whether or not it had to be loaded."""
        def ratio(a, b):
            return a / b if b else None
        made, ok, need = sum(self.pred_made), sum(self.pred_correct), sum(self.pred_needed)
        return {"predicted": made, "correct": ok, "needed": need,
                "precision": ratio(ok, made), "recall": ratio(ok, need),
                "precision_per_layer": [ratio(c, m) for c, m in zip(self.pred_correct, self.pred_made)],
                "recall_per_layer": [ratio(c, n) for c, n in zip(self.pred_correct, self.pred_needed)]}
