"""A run's recent steps recorded whole (Recorder.layer_rows, the fast path) and turned into step ×
layer rows with numpy when the Recorder compacts them: per-column list appends per step were most
of the recording's cost."""
from __future__ import annotations

from itertools import chain

import numpy as np


class StepRecords:
    """Steps recorded whole, oldest first, until they become rows (metrics.STEP_COLUMNS order).
    Each record: its row count, the step's scalars (step, batch, phase code, tokens, attention_s,
    prefetches, seqs, prefill_tokens) and its per-layer sequences (start_s, gate_s, end_s,
    compute_s, stall_s, misses, unique_experts)."""

    __slots__ = ("counts", "scalars", "layers", "rows")

    def __init__(self):
        self.counts: list[int] = []
        self.scalars: list[tuple] = []
        self.layers: list[tuple] = []
        self.rows = 0

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
            return np.repeat(np.array(sc[i], dtype=dtype), n)

        starts = np.cumsum(n) - n
        layer = np.arange(self.rows, dtype=np.int64) - np.repeat(starts, n)
        misses, uniq = flat(5, np.int64), flat(6, np.int64)
        pf = np.zeros(self.rows, dtype=np.int64)
        pf[starts[n > 0]] = np.array(sc[5], dtype=np.int64)[n > 0]  # a step's prefetches on its first row
        return (rep(0, np.int64), rep(1, np.int64), rep(2, np.int64), layer, rep(3, np.int64),
                flat(0, np.float64), flat(1, np.float64), flat(2, np.float64), rep(4, np.float64),
                flat(3, np.float64), flat(4, np.float64), uniq - misses, np.zeros(self.rows, dtype=np.int64),
                misses, uniq, pf, rep(6, np.int64), rep(7, np.int64))

    def columns(self, older: tuple[list, ...]) -> tuple:
        """Rows held column by column in `older` followed by the records' rows (the records are cleared)."""
        arrays = self._arrays()
        self._clear()
        if not older[0]:
            return arrays
        return tuple(np.concatenate([np.asarray(o, dtype=a.dtype), a]) for o, a in zip(older, arrays))

    def extend_into(self, cols: tuple[list, ...]) -> None:
        """Append the records' rows to the Python lists `cols` (the records are cleared)."""
        for col, a in zip(cols, self._arrays()):
            col.extend(a.tolist())
        self._clear()
