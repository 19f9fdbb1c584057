"""Metrics: counters and per-step × layer rows recorded during a run, and the summary built from
them. Plain Python lists (one per column) on the hot path; every _CHUNK rows become a typed chunk, appended to a
Parquet file as the run goes when the Recorder is given one (memory flat in trace length), and
the summary's step statistics are running sums, so it never needs the whole table."""
from __future__ import annotations

import functools
import math
import tempfile
from array import array
from pathlib import Path

import numpy as np
import pandas as pd

from ..models import ModelSpec
from .step_records import StepArrays, StepRecords

_CHUNK = 16384
_KEY_CHUNK = 1 << 16  # keys the KeyLog holds in memory before it appends them to its file
# batch: static batch number (-1 under continuous batching); seqs: sequences in the step;
# prefill_tokens: prompt tokens among `tokens` (a step with any is phase "prefill").
STEP_COLUMNS = ("step", "batch", "phase", "layer", "tokens", "start_s", "gate_s", "end_s", "attention_s",
                "compute_s", "stall_s", "hits", "late_hits", "misses", "unique_experts", "prefetches",
                "seqs", "prefill_tokens")


_STEP_TYPES = {"step": "int32", "batch": "int32", "phase": pd.CategoricalDtype(["prefill", "decode"]), "layer": "int16", "tokens": "int32",
               "hits": "int32", "late_hits": "int32", "misses": "int32", "unique_experts": "int32",
               "prefetches": "int32", "seqs": "int32", "prefill_tokens": "int32"}

_PHASES = {"prefill": 0, "decode": 1}  # the phase column's dictionary codes (its categories' order)


@functools.cache
def _step_schema():
    """The Arrow schema of a chunk of step rows, pandas metadata included: what
    ``pa.Table.from_pandas`` gives for a frame of _STEP_TYPES, so the table reads back as that frame."""
    import pyarrow as pa

    empty = pd.DataFrame({c: pd.Series([], dtype=_STEP_TYPES.get(c, "float64")) for c in STEP_COLUMNS})
    return pa.Schema.from_pandas(empty, preserve_index=False)


def _rows_table(cols: tuple[list, ...]):
    """Step rows held column by column (STEP_COLUMNS order; the phase as its _PHASES code) as one
    Arrow table of _step_schema() (a pandas frame of row tuples and its casts cost several times more)."""
    import pyarrow as pa

    if not len(cols[0]):  # as pandas types an empty frame (its float columns untyped), as before
        empty = pd.DataFrame.from_records([], columns=list(STEP_COLUMNS)).astype(_STEP_TYPES)
        return pa.Table.from_pandas(empty, preserve_index=False)
    schema = _step_schema()
    arrays = []
    for f, col in zip(schema, cols):
        if f.name == "phase":
            codes = pa.array(col, type=f.type.index_type)
            arrays.append(pa.DictionaryArray.from_arrays(codes, pa.array(list(_PHASES), type=f.type.value_type)))
        else:
            arrays.append(pa.array(col, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


REQUEST_COLUMNS = ("request_id", "batch", "arrival_s", "start_s", "first_token_s", "finish_s")


def percentiles(values, scale: float = 1.0) -> dict:
    a = np.asarray(values, dtype=float) * scale
    if a.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


class KeyLog:
    """Every layer's accessed keys in order (the gap report's stream), 4 bytes per access: a fixed
    buffer of _KEY_CHUNK keys, appended to an anonymous temporary file whenever it fills, so memory
    stays flat in trace length. Reads back as a sequence: ``len()`` and slices (int32 arrays)."""

    def __init__(self, chunk: int | None = None):
        self._buf = np.empty(chunk or _KEY_CHUNK, dtype=np.int32)
        self._n = 0            # keys in _buf (the newest)
        self._file = None      # TemporaryFile (unlinked at creation), opened at the first spill
        self._spilled = 0      # keys in _file (the oldest)

    def append(self, keys: np.ndarray) -> None:
        n, k = self._n, len(keys)
        if n + k > len(self._buf):
            self._spill(self._buf[:n])
            n = 0
            if k > len(self._buf):
                self._spill(np.asarray(keys, dtype=np.int32))
                self._n = 0
                return
        self._buf[n:n + k] = keys
        self._n = n + k

    def _spill(self, keys: np.ndarray) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="moesim-keys-")
        self._file.seek(self._spilled * 4)
        keys.astype("<i4", copy=False).tofile(self._file)
        self._spilled += len(keys)

    def __len__(self) -> int:
        return self._spilled + self._n

    def __getitem__(self, sl: slice) -> np.ndarray:
        """Keys [start, stop) as int32 (read from the file as far as they were spilled)."""
        if not isinstance(sl, slice):
            raise TypeError("KeyLog reads slices only")
        start, stop, step = sl.indices(len(self))
        if step != 1:
            raise ValueError("KeyLog reads contiguous slices only")
        stop = max(start, stop)
        parts = []
        if start < self._spilled:
            self._file.seek(start * 4)
            parts.append(np.fromfile(self._file, dtype="<i4", count=min(stop, self._spilled) - start))
        if stop > self._spilled:  # a copy: the buffer is overwritten after the next spill
            parts.append(self._buf[max(start - self._spilled, 0):stop - self._spilled].copy())
        if not parts:
            return np.zeros(0, dtype=np.int32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def array(self) -> np.ndarray:
        """The whole log as one int64 array (in memory: for small logs and tests)."""
        return self[:].astype(np.int64)

    def close(self) -> None:
        """Drop the temporary file (it is unlinked already; closing frees its disk space)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class Recorder:
    """Everything a run measures. The engine bumps the counters directly (they are hot)."""

    def __init__(self, model: ModelSpec, spill: Path | None = None):
        """`spill`: a Parquet file the step rows are streamed to (None: kept in memory)."""
        self.model = model
        self.spill = spill
        self._writer = None        # pyarrow ParquetWriter on `spill`, opened with the first chunk
        self._spilled = 0          # rows written to `spill`
        # running step statistics for the summary (what the steps table would give)
        self._rows_n = self._uniq_sum = 0
        self._dec_rows = self._dec_uniq = 0
        self._dec_by_seqs: dict[int, list[int]] = {}  # seqs -> [unique experts sum, rows]
        self._dec_steps = array("d")                  # decode steps' (max end - min start)
        self._dec_seqs_sum = 0                        # Σ over decode steps of the first row's seqs
        self._cur: list | None = None                 # [step, start min, end max] of the open decode step
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
        self._cols = tuple([] for _ in STEP_COLUMNS)  # recent step × layer rows, column by column ...
        self._pend = StepRecords()  # ... and after them, recent steps recorded whole (layer_rows, step_arrays) ...
        self._chunks: list[pd.DataFrame] = []  # ... compacted every _CHUNK rows (memory ~flat)
        self._req_start: dict[int, float] = {}    # admission: start of the request's first step
        self._req_arrival: dict[int, float] = {}
        self._req_first: dict[int, float] = {}
        self.idle_s = 0.0          # time with nothing runnable (waiting for arrivals)
        self.lengths: dict[int, tuple[int, int]] = {}  # request id -> (prompt, decode) tokens
        self.saved_loads = 0       # expert copies dedup avoided (Σ tokens_e − 1 over copied experts)
        self.requests: list[tuple] = []
        self._req_info: dict[int, tuple] = {}
        self._last_prefetch = 0
        self.steps = 0
        self.final: dict = {}
        self.on_step = None  # optional callback(tokens of the step) at each step's end (progress bar)

    def step_start(self, plan, t: float) -> None:
        if plan.admitted is not None:
            for rid, a in zip(plan.admitted.tolist(), plan.admitted_arrivals.tolist()):
                self._req_start[rid] = t
                self._req_arrival[rid] = t if math.isnan(a) else a  # NaN (closed): arrives when admitted
        self._last_prefetch = self.prefetch_issued

    def layer_row(self, plan, layer, t0, t_gate, t_end, attn, busy, stall, hits, late, misses, n_keys) -> None:
        self.hits += hits
        self.late_hits += late
        self.misses += misses
        self.compute_s += attn + busy
        self.stall_s += stall
        pf = self.prefetch_issued - self._last_prefetch
        self._last_prefetch = self.prefetch_issued
        seqs = len(plan.request_ids)
        row = (plan.index, plan.batch, _PHASES[plan.phase], layer, plan.tokens, t0, t_gate, t_end, attn,
               busy, stall, hits, late, misses, n_keys, pf, seqs, plan.prefill_tokens)
        if self._pend.rows:  # (rows stay in order: the whole steps' records before this row)
            self._pend.extend_into(self._cols)
        for col, v in zip(self._cols, row):
            col.append(v)
        self._rows_n += 1
        self._uniq_sum += n_keys
        if plan.phase == "decode":
            self._decode_rows(plan.index, seqs, 1, n_keys, t0, t_end)
        if len(self._cols[0]) >= _CHUNK:
            self._compact()

    def step_arrays(self, plan, attn: float, F: np.ndarray, I: np.ndarray, uniq: np.ndarray) -> None:
        """``layer_row`` for every layer of a step at once (the flat prefetch path), as its compiled
        call leaves them: F [n, 5] (start_s, gate_s, end_s, compute_s, stall_s) and I [n, 4] (hits,
        late_hits, misses, prefetches) in layer order, `attn` every row's attention seconds and
        uniq [n] its unique experts; the same rows and running sums (the float ones summed a row at
        a time, in order). The arrays are kept until the next compaction (StepArrays)."""
        n = F.shape[0]
        if not n:
            return
        t0, _gate, end, busy, stall = F.T.tolist()  # (lists: for 16 rows, cheaper than numpy's reductions)
        hits, late, misses, _pf = I.T.tolist()
        self.hits += sum(hits)
        self.late_hits += sum(late)
        self.misses += sum(misses)
        c, st = self.compute_s, self.stall_s
        for b in busy:
            c += attn + b
        for x in stall:
            st += x
        self.compute_s, self.stall_s = c, st
        nk, seqs = sum(uniq.tolist()), len(plan.request_ids)
        self._records(StepArrays).add((plan.index, plan.batch, _PHASES[plan.phase], plan.tokens, attn, seqs,
                                       plan.prefill_tokens), F, I, uniq)
        self._rows_n += n
        self._uniq_sum += nk
        if plan.phase == "decode":
            self._decode_rows(plan.index, seqs, n, nk, min(t0), max(end))
        if len(self._cols[0]) + self._pend.rows >= _CHUNK:
            self._compact()

    def _records(self, kind):
        """The pending whole steps, of `kind` (StepRecords, StepArrays): those of the other kind
        become column rows first, so that rows stay in order."""
        p = self._pend
        if type(p) is not kind:
            if p.rows:
                p.extend_into(self._cols)
            p = self._pend = kind()
        return p

    def layer_rows(self, plan, t0s, gates, ends, attn, busys, stalls, misses, n_keys) -> None:
        """Every layer's row of one step at once (the fast path, where no prefetch is issued during
        the layers): the same rows and running sums as ``layer_row`` per layer, in layer order. The
        step is kept as one record and turned into rows with numpy at the next compaction (StepRecords)."""
        n = len(t0s)
        nm, nk = sum(misses), sum(n_keys)
        self.hits += nk - nm
        self.misses += nm
        c, st = self.compute_s, self.stall_s
        for b in busys:  # (one float at a time, in layer order: the same sums as layer_row's)
            c += attn + b
        for x in stalls:
            st += x
        self.compute_s, self.stall_s = c, st
        pf = self.prefetch_issued - self._last_prefetch
        self._last_prefetch = self.prefetch_issued
        seqs = len(plan.request_ids)
        self._records(StepRecords).add(n, (plan.index, plan.batch, _PHASES[plan.phase], plan.tokens, attn, pf, seqs,
                                            plan.prefill_tokens), (t0s, gates, ends, busys, stalls, misses, n_keys))
        self._rows_n += n
        self._uniq_sum += nk
        if plan.phase == "decode" and n:
            self._decode_rows(plan.index, seqs, n, nk, min(t0s), max(ends))
        if len(self._cols[0]) + self._pend.rows >= _CHUNK:
            self._compact()

    def _decode_rows(self, step: int, seqs: int, n: int, n_keys: int, lo: float, hi: float) -> None:
        """Count `n` decode layer rows of step `step` (`n_keys` unique experts in all, spanning
        [lo, hi]) into the per-batch-size means and the step's span."""
        self._dec_rows += n
        self._dec_uniq += n_keys
        b = self._dec_by_seqs.get(seqs)
        if b is None:
            self._dec_by_seqs[seqs] = [n_keys, n]
        else:
            b[0] += n_keys
            b[1] += n
        cur = self._cur
        if cur is None or cur[0] != step:
            self._close_step()
            self._cur = [step, lo, hi]
            self._dec_seqs_sum += seqs
        else:
            if lo < cur[1]:
                cur[1] = lo
            if hi > cur[2]:
                cur[2] = hi

    def _close_step(self) -> None:
        if self._cur is not None:
            self._dec_steps.append(self._cur[2] - self._cur[1])
            self._cur = None

    def _compact(self) -> None:
        cols = self._cols
        if self._pend.rows:
            cols = self._pend.columns(cols)
        table = _rows_table(cols)
        for col in self._cols:
            col.clear()
        if self.spill is None:
            self._chunks.append(table.to_pandas())
            return
        import pyarrow.parquet as pq

        if self._writer is None:  # (times are all distinct: a dictionary page for them is tried and dropped)
            self._writer = pq.ParquetWriter(self.spill, table.schema,
                                            use_dictionary=[c for c in STEP_COLUMNS if not c.endswith("_s")])
        self._writer.write_table(table)
        self._spilled += table.num_rows

    def step_end(self, plan, t_start: float, t_end: float) -> None:
        self.steps += 1
        self.pairs += plan.pairs * self.model.num_layers  # token × expert pairs, all layers
        self.output_tokens += plan.output_tokens
        self.processed_tokens += plan.tokens
        if self.on_step is not None:
            self.on_step(plan.tokens)
        if plan.first_token_requests is not None:
            for rid in plan.first_token_requests.tolist():
                self._req_first[rid] = t_end
        if plan.finished_requests is not None and len(plan.finished_requests):
            for rid in plan.finished_requests.tolist():
                self.requests.append((rid, plan.batch, self._req_arrival[rid], self._req_start[rid],
                                      self._req_first[rid], t_end))

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
        """The whole step × layer table (read back from the spill file when there is one)."""
        if self.spill is not None:
            return pd.read_parquet(self.steps_file())
        if self._cols[0] or self._pend.rows or not self._chunks:
            self._compact()
        if len(self._chunks) > 1:
            self._chunks = [pd.concat(self._chunks, ignore_index=True)]
        return self._chunks[0]

    def steps_file(self) -> Path:
        """Finish the spill file (every row written) and return its path."""
        if self._cols[0] or self._pend.rows or self._writer is None:
            self._compact()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.spill

    def requests_frame(self) -> pd.DataFrame:
        """One row per finished request: arrival, admission (start of its first step), first token
        and finish times; queueing delay, TTFT and end-to-end latency from arrival; TPOT =
        (finish − first token) / decode tokens (NaN without decode tokens)."""
        df = pd.DataFrame.from_records(self.requests, columns=list(REQUEST_COLUMNS))
        df = df.sort_values("request_id", kind="stable").reset_index(drop=True)
        lens = self.lengths
        df["prompt_tokens"] = np.array([lens.get(r, (0, 0))[0] for r in df["request_id"]], dtype=np.int64)
        dec = np.array([lens.get(r, (0, 0))[1] for r in df["request_id"]], dtype=np.int64)
        df["output_tokens"] = dec + 1  # the prefill makes the first, each decode token one more
        df["queue_ms"] = (df["start_s"] - df["arrival_s"]) * 1e3
        df["ttft_ms"] = (df["first_token_s"] - df["arrival_s"]) * 1e3
        with np.errstate(divide="ignore", invalid="ignore"):
            df["tpot_ms"] = np.where(dec > 0, (df["finish_s"] - df["first_token_s"]).to_numpy() * 1e3
                                     / np.maximum(dec, 1), np.nan)
        df["e2e_ms"] = (df["finish_s"] - df["arrival_s"]) * 1e3
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

    def summary(self, decode_tokens: dict[int, int] | None = None, slo=None) -> dict:
        """The headline numbers. `decode_tokens` maps request id → decode steps (for TPOT; default:
        `self.lengths`); `slo` (config.SLOConfig or None) sets the SLO attainment targets."""
        f = self.final
        makespan = f["makespan_s"]
        if decode_tokens is not None:
            for rid, n in decode_tokens.items():
                if rid not in self.lengths:
                    self.lengths[rid] = (0, n)
        req = self.requests_frame()
        tpot = []
        for rid, first, fin in zip(req["request_id"], req["first_token_s"], req["finish_s"]):
            n = self.lengths.get(int(rid), (0, 0))[1]
            if n > 0:
                tpot.append((fin - first) / n)
        accesses = self.hits + self.late_hits + self.misses
        p_tr, p_bytes, p_busy, p_slots = f["pcie"]
        d_tr, d_bytes, d_busy, d_slots = f["disk"]
        dram_lookups = self.dram_hits + self.dram_misses
        self._close_step()
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
            "decode_step_ms": percentiles(self._dec_steps, 1e3),
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
            "requests_per_s": len(req) / makespan if makespan > 0 else None,
            "queue_ms": percentiles(req["queue_ms"]),
            "idle_s": self.idle_s,
            "slo": self.slo_attainment(req, slo, makespan),
            "dedup": self.dedup_summary(accesses),
        }

    def slo_attainment(self, req: pd.DataFrame, slo, makespan: float) -> dict | None:
        """Share of requests meeting each target and all of them (a request without decode
        tokens meets any TPOT target); goodput = requests meeting every target per second."""
        if slo is None or (slo.ttft_ms is None and slo.tpot_ms is None):
            return None
        n = len(req)
        ok = np.ones(n, dtype=bool)
        out: dict = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
        if slo.ttft_ms is not None:
            t = (req["ttft_ms"] <= slo.ttft_ms).to_numpy()
            out["ttft_attainment"] = float(t.mean()) if n else None
            ok &= t
        if slo.tpot_ms is not None:
            t = (req["tpot_ms"].isna() | (req["tpot_ms"] <= slo.tpot_ms)).to_numpy()
            out["tpot_attainment"] = float(t.mean()) if n else None
            ok &= t
        out["attainment"] = float(ok.mean()) if n else None
        out["goodput_requests_per_s"] = float(ok.sum()) / makespan if makespan > 0 else None
        return out

    def dedup_summary(self, accesses: int) -> dict:
        """Expert loads requested without dedup (token×expert pairs) vs performed with it (one
        per unique expert, step and layer); copies saved (a miss or late prefetch of an expert
        with tokens_e tokens would be copied tokens_e times without dedup); unique experts per
        layer, overall, in decode steps, and in decode steps by the number of sequences (from
        the running sums of layer_row: exact integer sums, so the same as the table's means)."""
        def mean(total, n):
            return float(total) / n if n else None
        return {
            "loads_requested": self.pairs,
            "loads_performed": accesses,
            "ratio": 1.0 - accesses / self.pairs if self.pairs else 0.0,
            "copies_saved": self.saved_loads,
            "bytes_saved": self.saved_loads * self.model.expert_bytes,
            "unique_experts_per_layer": mean(self._uniq_sum, self._rows_n),
            "unique_experts_per_layer_decode": mean(self._dec_uniq, self._dec_rows),
            "unique_experts_by_batch_size": {str(int(k)): float(v[0]) / v[1]
                                             for k, v in sorted(self._dec_by_seqs.items())},
            "mean_decode_batch": mean(self._dec_seqs_sum, len(self._dec_steps)),
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
