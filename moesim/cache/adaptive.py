"""``lirs``, ``wtinylfu`` and ``lecar``: libCacheSim has them, but exact agreement with its C code
is impossible, so these follow their papers with libCacheSim's default parameters and are
checked against plain references and for near-agreement with libCacheSim
(``tests/test_cache_adaptive.py``):

* **lirs** (Jiang & Zhang, SIGMETRICS 2002), HIR set 1 % of the slots (at least 1), stack kept to
  ``capacity`` non-resident entries. libCacheSim's LIRS evicts on some hits (a hit on a resident
  HIR block outside the stack demotes a LIR block into a full HIR queue), which a cache that
  evicts only to make room for a miss cannot do.
* **wtinylfu** (Einziger et al. 2017): 1 % LRU window (libCacheSim's ``window-size=0.01``), main
  SLRU with a 1:4 probation:protected split, admission of the window's victim only if its
  frequency beats the main victim's; counts are kept on inserts and main hits and halved every
  ``32 x main size`` main hits, as libCacheSim does -- but exactly, where libCacheSim counts in a
  hashed counting Bloom filter whose collisions change admissions.
* **lecar** (Vietri et al., HotStorage 2018): LRU and LFU experts with ghost histories of
  ``capacity`` entries each, learning rate 0.45, discount ``0.005 ** (1 / capacity)``, starting
  weights 0.5; the victim comes from LRU with probability ``w_lru``. Randomised: every draw comes
  from a seeded ``numpy.random.Generator`` (in a run, one per partition spawned from the
  scenario seed; seed 0 when none is passed), so runs repeat exactly, but they cannot repeat
  libCacheSim's C ``rand()`` draws.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Container, Hashable

import numpy as np

from .modern import SLRU, _first_free, _Union
from .policies import LFU, _Keyed

__all__ = ["LIRS", "WTinyLFU", "LeCaR"]


class LIRS(_Keyed):
    """LIRS: LIR blocks (small inter-reference recency) stay; resident HIR blocks queue in ``_q``
    and are evicted from its front. ``_s`` is the recency stack, bottom first, each key marked
    ``L`` (LIR), ``H`` (resident HIR) or ``N`` (non-resident HIR)."""

    __slots__ = ("_s", "_q", "_lir", "_lir_cap", "_nr", "_nr_cap")
    name = "lirs"

    def __init__(self, capacity: int | None = None, hir_ratio: float = 0.01) -> None:
        cap = capacity if capacity is not None else 64
        self._s: OrderedDict[int, str] = OrderedDict()
        self._q: OrderedDict[int, None] = OrderedDict()
        self._lir: set[int] = set()
        self._lir_cap = max(0, cap - max(1, int(hir_ratio * cap)))
        self._nr = 0
        self._nr_cap = max(1, cap)
        self._res = _Union(self._lir, self._q)

    def _prune(self) -> None:
        s = self._s
        while s:
            k, st = next(iter(s.items()))
            if st == "L":
                return
            del s[k]
            if st == "N":
                self._nr -= 1

    def _demote_bottom_lir(self) -> None:
        """If the LIR set is over its size, its bottom-most block becomes a resident HIR."""
        if len(self._lir) <= self._lir_cap:
            return
        self._prune()
        s = self._s
        k = next(iter(s))   # the bottom is LIR after a prune
        s[k] = "H"
        self._lir.discard(k)
        self._q[k] = None
        del s[k]            # an HIR at the bottom is pruned at once
        self._prune()

    def _push(self, key: int, st: str) -> None:
        s = self._s
        if key in s and s[key] == "N":
            self._nr -= 1
        s[key] = st
        s.move_to_end(key)

    def insert(self, key, next_use=None):
        if key in self._res:
            raise ValueError(f"key {key} is already resident")
        if len(self._lir) < self._lir_cap:          # warm-up: LIR until the LIR set is full
            self._push(key, "L")
            self._lir.add(key)
        elif self._s.get(key) == "N":               # recent enough to be LIR
            self._push(key, "L")
            self._lir.add(key)
            self._demote_bottom_lir()
        else:
            self._push(key, "H")
            self._q[key] = None
        self._limit()

    def touch(self, key, next_use=None):
        s = self._s
        if key in self._lir:
            bottom = next(iter(s)) == key
            self._push(key, "L")
            if bottom:
                self._prune()
        elif key in s:                              # resident HIR in the stack: becomes LIR
            del self._q[key]
            self._push(key, "L")
            self._lir.add(key)
            self._demote_bottom_lir()
        else:
            self._q.move_to_end(key)                # KeyError if not resident
            self._push(key, "H")

    def _limit(self) -> None:
        if self._nr > self._nr_cap:
            s = self._s
            for k, st in s.items():
                if st == "N":
                    del s[k]
                    self._nr -= 1
                    return

    def _drop(self, key: int, ghost: bool) -> None:
        s = self._s
        if key in self._lir:
            self._lir.discard(key)
            del s[key]
            self._prune()
            return
        del self._q[key]
        if key in s:
            if ghost:
                s[key] = "N"
                self._nr += 1
                self._limit()
            else:
                del s[key]

    def remove(self, key):
        self._drop(key, ghost=False)

    def evict(self, key):
        self._drop(key, ghost=True)

    def victim(self, excluded: Container[Hashable] = ()):
        k = _first_free(self._q, excluded)
        if k is None:
            k = next((x for x, st in self._s.items() if st == "L" and x not in excluded), None)
        return k


class WTinyLFU(_Keyed):
    """W-TinyLFU with exact frequency counts (see the module docstring)."""

    __slots__ = ("_win", "_main", "_win_cap", "_main_cap", "_count", "_hits", "_decay_at", "_plan")
    name = "wtinylfu"

    def __init__(self, capacity: int | None = None, window: float = 0.01) -> None:
        cap = capacity if capacity is not None else 64
        self._win: OrderedDict[int, None] = OrderedDict()
        self._win_cap = int(cap * window)
        self._main_cap = m = cap - self._win_cap
        self._main = SLRU(m, n_seg=2)
        self._main._caps = [m // 5, m - m // 5]
        self._count: dict[int, int] = {}
        self._hits = 0
        self._decay_at = max(1, 32 * m)
        self._plan = None
        self._res = _Union(self._win, self._main._of)

    def _add(self, key: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1

    def insert(self, key, next_use=None):
        if key in self._res:
            raise ValueError(f"key {key} is already resident")
        self._win[key] = None
        self._add(key)

    def touch(self, key, next_use=None):
        if key in self._win:
            self._win.move_to_end(key)
            return
        self._main.touch(key)
        self._add(key)
        self._hits += 1
        if self._hits >= self._decay_at:
            self._hits = 0
            self._count = {k: c // 2 for k, c in self._count.items() if c > 1}

    def remove(self, key):
        if self._win.pop(key, 0) is not None:
            self._main.remove(key)

    def victim(self, excluded: Container[Hashable] = ()):
        self._plan = None
        while True:
            cand = _first_free(self._win, excluded)
            if cand is None:
                return self._main.victim(excluded)
            if len(self._main) < self._main_cap:    # room in main: the window's victim moves there
                del self._win[cand]
                self._main.insert(cand)
                continue
            mv = self._main.victim(excluded)
            if mv is not None and self._count.get(cand, 0) > self._count.get(mv, 0):
                self._plan = (mv, cand)
                return mv
            return cand

    def evict(self, key):
        plan, self._plan = self._plan, None
        self.remove(key)
        if plan is not None and plan[0] == key and plan[1] in self._win:
            del self._win[plan[1]]
            self._main.insert(plan[1])


class LeCaR(_Keyed):
    """LeCaR: regret-weighted choice between an LRU and an LFU victim (see the module docstring)."""

    __slots__ = ("_lru", "_lfu", "_h", "_w", "_rng", "_t", "_lr", "_disc", "_hcap", "_plan", "_resume")
    name = "lecar"
    randomised = True

    def __init__(self, capacity: int | None = None, rng: np.random.Generator | None = None,
                 learning_rate: float = 0.45) -> None:
        cap = capacity if capacity is not None else 64
        self._lru: OrderedDict[int, None] = OrderedDict()   # recency, oldest first
        self._lfu = LFU()                                   # the LFU expert: its victim, in O(log n)
        self._resume: dict[int, int] = {}                   # count a ghost hit hands back to LFU
        self._res = self._lru
        self._h = (OrderedDict(), OrderedDict())            # ghosts of LRU's and LFU's victims: key -> (t, freq)
        self._w = [0.5, 0.5]
        self._rng = rng if rng is not None else np.random.default_rng(0)
        self._t = 0
        self._lr = learning_rate
        self._disc = 0.005 ** (1 / max(1, cap))
        self._hcap = max(1, cap)
        self._plan = None

    def miss(self, key):
        self._t += 1
        for i, h in enumerate(self._h):
            e = h.pop(key, None)
            if e is not None:                               # expert i evicted it wrongly
                r = self._disc ** (self._t - e[0])
                self._w[1 - i] *= math.exp(self._lr * r)
                s = sum(self._w)
                self._w = [w / s for w in self._w]
                self._resume[key] = e[1]                    # LFU resumes its count
                return

    def insert(self, key, next_use=None):
        if key in self._lru:
            raise ValueError(f"key {key} is already resident")
        self._lru[key] = None
        self._lfu.insert(key)
        f = self._resume.pop(key, 0)
        if f:   # a higher true count than the heap entry's 1 keeps LFU's lazy heap valid
            self._lfu._freq[key] = f + 1

    def touch(self, key, next_use=None):
        self._t += 1
        self._lru.move_to_end(key)
        self._lfu.touch(key)

    def remove(self, key):
        del self._lru[key]
        self._lfu.remove(key)

    def victim(self, excluded: Container[Hashable] = ()):
        lru = _first_free(self._lru, excluded)
        if lru is None:
            return None
        lfu = self._lfu.victim(excluded)   # fewest accesses, ties to the least recent
        use_lru = self._rng.random() < self._w[0]
        self._plan = (lru if use_lru else lfu, 0 if use_lru else 1)
        return self._plan[0]

    def evict(self, key):
        plan, self._plan = self._plan, None
        if plan is not None and plan[0] == key:
            h = self._h[plan[1]]
            h[key] = (self._t, self._lfu.frequency(key))
            if len(h) > self._hcap:
                h.popitem(last=False)
        self.remove(key)

    def weights(self) -> tuple[float, float]:
        """(w_lru, w_lfu) now."""
        return self._w[0], self._w[1]
