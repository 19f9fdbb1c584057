"""A run's recent steps recorded whole (Recorder.layer_rows, the fast path; Recorder.step_arrays,
the flat prefetch path) and turned into step × layer rows with numpy when the Recorder compacts
them: per-column list appends per step were most of the recording's cost."""
from __future__ import annotations

from itertools import chain

import numpy as np


class _Records:
    """Whole steps held until they become rows; `_arrays` (one array per metrics.STEP_COLUMNS
    column) and `_clear` are each kind's own."""

    __slots__ = ()
    rows: int

    def _arrays(self) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def columns(self, older: tuple[list, ...]) -> tuple:
        """Rows held column by column in `older` followed by the records' rows (the records are cleared)."""
        arrays = self._arrays()
        self._clear()
        if not len(older[0]):
            return arrays
        return tuple(np.concatenate([np.asarray(o, dtype=a.dtype), a]) for o, a in zip(older, arrays))

    def extend_into(self, cols: tuple[list, ...]) -> None:
        """Append the records' rows to the Python lists `cols` (the records are cleared)."""
        for col, a in zip(cols, self._arrays()):
            col.extend(a.tolist())
        self._clear()


def _layer_index(n: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's layer (its place in its step) and each step's first row, for steps of n[i] rows."""
    starts = np.cumsum(n) - n
    return np.arange(rows, dtype=np.int64) - np.repeat(starts, n), starts


def _rep(values, dtype, n: np.ndarray) -> np.ndarray:
    """Each step's scalar values[i] repeated on its n[i] rows."""
    return np.repeat(np.array(values, dtype=dtype), n)


class StepRecords(_Records):
    """Steps recorded whole, oldest first, until they become rows (metrics.STEP_COLUMNS order).
    Each record: its row count, the step's scalars (step, batch, phase code, tokens, attention_s,
    prefetches, seqs, prefill_tokens) and its per-layer sequences (start_s, gate_s, end_s,
    compute_s, stall_s, misses, unique_experts)."""

    __slots__ = ("counts", "scalars", "layers", "rows")

    def __init__(self):
        self._clear()

    def add(self, n: int, scalars: tuple, layers: tuple) -> None:
        self.counts.append(n)
        self.scalars.append(scalars)
        self.layers.append(layers)
        self.rows += n

    def _clear(self) -> None:
        self.counts, self.scalars, self.layers, self.rows = [], [], [], 0

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """The records' rows, one array per STEP_COLUMNS column."""
        n = np.array(self.counts, dtype=np.int64)
        sc = list(zip(*self.scalars))
        per = list(zip(*self.layers))

        def flat(i: int, dtype) -> np.ndarray:
            return np.fromiter(chain.from_iterable(per[i]), dtype=dtype, count=self.rows)

        def rep(i: int, dtype) -> np.ndarray:
            return _rep(sc[i], dtype, n)

        layer, starts = _layer_index(n, self.rows)
        misses, uniq = flat(5, np.int64), flat(6, np.int64)
        pf = np.zeros(self.rows, dtype=np.int64)
        pf[starts[n > 0]] = np.array(sc[5], dtype=np.int64)[n > 0]  # a step's prefetches on its first row
        return (rep(0, np.int64), rep(1, np.int64), rep(2, np.int64), layer, rep(3, np.int64),
                flat(0, np.float64), flat(1, np.float64), flat(2, np.float64), rep(4, np.float64),
                flat(3, np.float64), flat(4, np.float64), uniq - misses, np.zeros(self.rows, dtype=np.int64),
                misses, uniq, pf, rep(6, np.int64), rep(7, np.int64))


class StepArrays(_Records):
    """Steps recorded whole as the flat prefetch path's compiled call leaves them, oldest first.
    Each record: its step's scalars (step, batch, phase code, tokens, attention_s, seqs,
    prefill_tokens), F [n, 5] (start_s, gate_s, end_s, compute_s, stall_s), I [n, 4] (hits,
    late_hits, misses, prefetches) and unique_experts [n]. The arrays are kept, not copied."""

    __slots__ = ("counts", "scalars", "F", "I", "uniq", "rows")

    def __init__(self):
        self._clear()

    def add(self, scalars: tuple, F: np.ndarray, I: np.ndarray, uniq: np.ndarray) -> None:
        n = F.shape[0]
        self.counts.append(n)
        self.scalars.append(scalars)
        self.F.append(F)
        self.I.append(I)
        self.uniq.append(uniq)
        self.rows += n

    def _clear(self) -> None:
        self.counts, self.scalars, self.F, self.I, self.uniq, self.rows = [], [], [], [], [], 0

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """The records' rows, one array per STEP_COLUMNS column."""
        n = np.array(self.counts, dtype=np.int64)
        sc = list(zip(*self.scalars))

        def rep(i: int, dtype) -> np.ndarray:
            return _rep(sc[i], dtype, n)

        F = np.concatenate(self.F).astype(np.float64, copy=False)
        I = np.concatenate(self.I).astype(np.int64, copy=False)
        uniq = np.concatenate(self.uniq).astype(np.int64, copy=False)
        layer, _ = _layer_index(n, self.rows)
        return (rep(0, np.int64), rep(1, np.int64), rep(2, np.int64), layer, rep(3, np.int64),
                F[:, 0], F[:, 1], F[:, 2], rep(4, np.float64), F[:, 3], F[:, 4], I[:, 0], I[:, 1], I[:, 2], uniq,
                I[:, 3], rep(5, np.int64), rep(6, np.int64))
