"""Eviction policies of the expert cache: ``lru``, ``lfu``, ``fifo``, ``belady``.

A policy orders the keys (plain ints) resident in one cache partition and names the one it would
evict. It holds no capacity and never evicts on its own: the owner (:class:`moesim.cache.tiers.Tier`,
or :func:`moesim.cache.replay.replay`) asks :meth:`Policy.victim` and then calls :meth:`Policy.remove`.

Incremental API (every policy):

``insert(key, next_use=None)``
    ``key`` becomes resident. Counts as an access: LRU makes it the most recent, LFU gives it
    frequency 1 (and makes it the most recent among frequency 1), FIFO makes it the newest.
    Inserting a resident key raises ``ValueError``.
``touch(key, next_use=None)``
    A hit on a resident key (``KeyError`` if not resident).
``remove(key)``
    ``key`` leaves (``KeyError`` if not resident). With LFU its frequency is forgotten.
``victim(excluded=()) -> key | None``
    The key the policy would evict now, skipping keys in the container ``excluded`` (pinned or
    in-flight keys); ``None`` if every resident key is excluded. Does not remove anything (it may
    reorder internal queues, e.g. clear CLOCK bits, as libCacheSim's eviction does).
``miss(key)``
    ``key`` was requested and is not resident; called before any eviction made for it (ghost
    look-ups of ARC, 2Q, S3-FIFO). A no-op for the policies here.
``evict(key)``
    The victim leaves to make room (policies with ghosts remember it); ``remove`` is a key
    leaving for any other reason. Here the same as ``remove``.

A policy class takes the capacity of its partition (``cls(capacity)``): queue-based policies
size their queues from it; the ones here ignore it. More policies live in
:mod:`moesim.cache.modern` (libCacheSim's) and :mod:`moesim.cache.frequency` (moesim's own);
``<name>+second_touch`` wraps any policy in the admission filter of
:mod:`moesim.cache.admission`.

``next_use`` is the stream position of the key's next request (``None`` or ``math.inf`` when
there is none); only Belady reads it, the others accept and ignore it.

Semantics follow libCacheSim 0.3.5 (checked against ``process_trace`` in
``tests/test_cache_libcachesim.py``):

* **LRU** evicts the least recently inserted-or-touched key.
* **FIFO** evicts the earliest inserted key; hits do not reorder.
* **LFU** evicts the key with the fewest accesses *since it was last inserted* (frequency is
  counted only while resident and reset on eviction); among equally frequent keys, the least
  recently accessed one (its last insert or touch is the oldest).
* **Belady** evicts the key whose next use is farthest in the future; keys never used again
  (``next_use`` ``None``/``inf``) go first. Equal next uses (only possible among keys never
  used again, or when a caller passes duplicates) are broken by least recently accessed (the
  oldest last insert/touch goes first). With exact next uses this is Belady's MIN; which dead key
  goes first does not change a miss count.

Costs: LRU and FIFO are O(1) per call (an ``OrderedDict``); ``victim`` walks past excluded keys
from the eviction end, so it costs O(1 + number of excluded keys it meets). LFU and Belady keep
a binary heap with lazy deletion: ``insert``/``touch`` are O(1) (LFU) or O(log n) (Belady),
``victim`` is amortised O(log n) plus O(log n) per excluded key it meets.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Container, Hashable

__all__ = ["Policy", "LRU", "FIFO", "LFU", "Belady", "POLICIES", "ADMISSION", "get_policy", "policy_class"]

_INF = math.inf
_push = heapq.heappush


class Policy:
    """Interface of an eviction policy (see the module docstring)."""

    __slots__ = ()
    name: str = ""
    needs_next_use: bool = False  # True: insert/touch must be given next_use
    randomised: bool = False      # True: the constructor takes rng (a seeded numpy Generator)

    def insert(self, key: int, next_use: float | None = None) -> None:  # pragma: no cover
        raise NotImplementedError

    def touch(self, key: int, next_use: float | None = None) -> None:  # pragma: no cover
        raise NotImplementedError

    def remove(self, key: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def victim(self, excluded: Container[Hashable] = ()) -> int | None:  # pragma: no cover
        raise NotImplementedError

    def miss(self, key: int) -> None:
        """``key`` was requested and is not resident (before any eviction for it)."""

    def evict(self, key: int) -> None:
        """``key`` (the victim) leaves to make room."""
        self.remove(key)

    def __len__(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:  # pragma: no cover
        raise NotImplementedError

    def keys(self) -> list[int]:  # pragma: no cover
        """Resident keys, in no promised order."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} keys)"


class _Keyed(Policy):
    """A policy whose resident keys are the keys of one dict, ``_res``."""

    __slots__ = ("_res",)

    def __len__(self) -> int:
        return len(self._res)

    def __contains__(self, key: object) -> bool:
        return key in self._res

    def keys(self) -> list[int]:
        return list(self._res)


class _Ordered(_Keyed):
    """Shared body of LRU and FIFO: an OrderedDict, eviction end first."""

    __slots__ = ("_od",)

    def __init__(self, capacity: int | None = None) -> None:
        self._od: OrderedDict[int, None] = OrderedDict()
        self._res = self._od

    def insert(self, key: int, next_use: float | None = None) -> None:
        od = self._od
        if key in od:
            raise ValueError(f"key {key} is already resident")
        od[key] = None

    def remove(self, key: int) -> None:
        del self._od[key]

    def victim(self, excluded: Container[Hashable] = ()) -> int | None:
        for k in self._od:
            if k not in excluded:
                return k
        return None


class LRU(_Ordered):
    """Least recently used: evicts the key whose last insert or touch is the oldest."""

    __slots__ = ()
    name = "lru"

    def touch(self, key: int, next_use: float | None = None) -> None:
        self._od.move_to_end(key)


class FIFO(_Ordered):
    """First in, first out: evicts the key inserted earliest; a touch changes nothing."""

    __slots__ = ()
    name = "fifo"

    def touch(self, key: int, next_use: float | None = None) -> None:
        if key not in self._od:
            raise KeyError(key)


class _Heaped(_Keyed):
    """A policy that keeps its eviction order in a heap ``_heap`` with lazy deletion."""

    __slots__ = ()

    def _top(self) -> int | None:  # pragma: no cover
        """The key of the top heap entry if that entry is current; else drop or re-push it, None."""
        raise NotImplementedError

    def victim(self, excluded: Container[Hashable] = ()) -> int | None:
        heap, top = self._heap, self._top
        held: list[tuple] = []
        found = None
        while heap:
            k = top()
            if k is None:
                continue
            if k in excluded:
                held.append(heapq.heappop(heap))
                continue
            found = k
            break
        for e in held:
            heapq.heappush(heap, e)
        return found


class LFU(_Heaped):
    """Least frequently used, libCacheSim semantics.

    The frequency of a key counts its insert plus its touches since that insert; removal forgets
    it (a re-inserted key starts at 1 again). Victim: the lowest frequency; ties go to the least
    recently accessed key (oldest last insert/touch).

    Implementation: ``_freq``/``_last`` hold each resident key's true (frequency, tick of last
    access); the heap holds one entry per residency whose value is never *greater* than the true
    one (a touch only raises it, and touches do not push), so the true minimum is found by
    popping, re-pushing entries whose stored value is stale, until the top entry is current.
    Entries of removed keys (or of an earlier residency: tick older than the insert) are dropped
    when they surface.
    """

    __slots__ = ("_freq", "_last", "_ins", "_heap", "_tick")
    name = "lfu"

    def __init__(self, capacity: int | None = None) -> None:
        self._freq: dict[int, int] = {}
        self._res = self._freq
        self._last: dict[int, int] = {}
        self._ins: dict[int, int] = {}   # tick of the insert that began the current residency
        self._heap: list[tuple[int, int, int]] = []
        self._tick = 0

    def insert(self, key: int, next_use: float | None = None) -> None:
        if key in self._freq:
            raise ValueError(f"key {key} is already resident")
        self._tick = t = self._tick + 1
        self._freq[key] = 1
        self._last[key] = t
        self._ins[key] = t
        heap = self._heap
        heapq.heappush(heap, (1, t, key))
        if len(heap) > 4 * len(self._freq) + 256:
            self._compact()

    def touch(self, key: int, next_use: float | None = None) -> None:
        self._freq[key] += 1  # KeyError if not resident
        self._tick = t = self._tick + 1
        self._last[key] = t

    def remove(self, key: int) -> None:
        del self._freq[key]
        del self._last[key]
        del self._ins[key]

    def _compact(self) -> None:
        last = self._last
        self._heap = [(f, last[k], k) for k, f in self._freq.items()]
        heapq.heapify(self._heap)

    def _top(self) -> int | None:
        heap = self._heap
        f, t, k = heap[0]
        tf = self._freq.get(k)
        if tf is None or t < self._ins[k]:  # removed, or an entry of an earlier residency
            heapq.heappop(heap)
            return None
        tl = self._last[k]
        if tf != f or tl != t:               # stale (k was touched since): move it down
            heapq.heapreplace(heap, (tf, tl, k))
            return None
        return k

    def frequency(self, key: int) -> int:
        """Accesses of ``key`` since its last insert (KeyError if not resident)."""
        return self._freq[key]


class Belady(_Heaped):
    """Belady's MIN: evicts the key whose next use is farthest away.

    ``next_use`` (the stream position of the key's next request) must be passed to ``insert`` and
    ``touch``; ``None`` or ``math.inf`` means never again, and such keys are evicted first. Ties
    (equal next uses) go to the least recently accessed key (oldest last insert/touch).

    A cache that is not told about every access (a tier behind another one, or an access served
    by an in-flight copy) keeps stale next uses that lie in the past, which would make those keys
    look about to be used and pin them forever. :meth:`expire` fixes that: the owner passes the
    current position and a ``next_use(key, pos)`` function, and every key whose stored next use is
    ``<= now`` gets its next use after ``now`` looked up again.
    """

    __slots__ = ("_nu", "_heap", "_due", "_tick")
    name = "belady"
    needs_next_use = True

    def __init__(self, capacity: int | None = None) -> None:
        self._nu: dict[int, tuple[float, int]] = {}        # key -> (next use, tick of last access)
        self._res = self._nu
        self._heap: list[tuple[float, int, int]] = []      # (-next use, tick, key): max next use first
        self._due: list[tuple[float, int, int]] = []       # (next use, tick, key): earliest first
        self._tick = 0

    def _set(self, key: int, next_use: float | None) -> None:
        nu = _INF if next_use is None else next_use
        self._tick = t = self._tick + 1
        cur = self._nu
        cur[key] = (nu, t)
        heap = self._heap
        _push(heap, (-nu, t, key))
        if nu != _INF:
            _push(self._due, (nu, t, key))
        if len(heap) > 4 * len(cur) + 256:
            self._compact()

    def insert(self, key: int, next_use: float | None = None) -> None:
        if key in self._nu:
            raise ValueError(f"key {key} is already resident")
        self._set(key, next_use)

    def touch(self, key: int, next_use: float | None = None) -> None:
        if key not in self._nu:
            raise KeyError(key)
        self._set(key, next_use)

    def remove(self, key: int) -> None:
        del self._nu[key]

    def _compact(self) -> None:
        items = self._nu.items()
        self._heap = [(-nu, t, k) for k, (nu, t) in items]
        heapq.heapify(self._heap)
        self._due = [(nu, t, k) for k, (nu, t) in items if nu != _INF]
        heapq.heapify(self._due)

    def expire(self, now: float, next_use) -> None:
        """Re-look-up the next use of every key whose stored next use is ``<= now``:
        ``next_use(key, now)`` must give the first request of ``key`` after ``now``."""
        due, cur = self._due, self._nu
        while due and due[0][0] <= now:
            nu, t, k = heapq.heappop(due)
            if cur.get(k) == (nu, t):  # still k's current entry: stale, refresh (keeps its tick)
                new = next_use(k, now)
                new = _INF if new is None else new
                if new <= now:
                    raise ValueError(f"next_use({k}, {now}) returned {new}: must be after {now}")
                cur[k] = (new, t)
                heapq.heappush(self._heap, (-new, t, k))
                if new != _INF:
                    heapq.heappush(due, (new, t, k))
        if len(self._due) > 4 * len(cur) + 256:
            self._compact()

    def _top(self) -> int | None:
        heap = self._heap
        negnu, t, k = heap[0]
        if self._nu.get(k) != (-negnu, t):  # superseded or removed
            heapq.heappop(heap)
            return None
        return k

    def next_use_of(self, key: int) -> float:
        """The stored next use of a resident key."""
        return self._nu[key][0]


class NoPolicy(Policy):
    """Stands in for the policy of an unbounded tier (cache/tiers.py): it never has to choose a victim."""

    __slots__ = ()
    name = "none"

    def insert(self, key, next_use=None):
        pass

    touch = remove = insert

    def victim(self, excluded=()):
        return None

    def __len__(self):
        return 0

    def __contains__(self, key):
        return False

    def keys(self):
        return []


NO_POLICY = NoPolicy()


POLICIES: dict[str, type[Policy]] = {"lru": LRU, "lfu": LFU, "fifo": FIFO, "belady": Belady}
ADMISSION = "+second_touch"   # suffix: wrap the named policy in the second-touch admission filter


def policy_class(name: str) -> type[Policy]:
    """The class registered as ``name`` (an admission suffix is ignored); KeyError naming the
    known ones."""
    base = name[: -len(ADMISSION)] if isinstance(name, str) and name.endswith(ADMISSION) else name
    try:
        return POLICIES[base]
    except (KeyError, TypeError):
        raise KeyError(f"unknown eviction policy {name!r} (known: {', '.join(sorted(POLICIES))}; "
                       f"any of them{ADMISSION} adds the second-touch admission filter)") from None


def get_policy(name: str, capacity: int | None = None, rng=None) -> Policy:
    """A new, empty instance of the policy registered as ``name``, sized for ``capacity`` keys
    (KeyError naming the known ones). ``rng`` (a seeded numpy Generator) goes to randomised
    policies; without it they seed their own with 0."""
    cls = policy_class(name)
    if cls.randomised and rng is not None:
        inner = cls(capacity, rng=rng)
        if name.endswith(ADMISSION):
            from .admission import SecondTouch

            return SecondTouch(inner, capacity)
        return inner
    if name.endswith(ADMISSION):
        if cls.needs_next_use:
            raise KeyError(f"eviction policy {name!r}: {cls.name} is the offline optimum; an admission "
                           "filter does not apply to it")
        from .admission import SecondTouch

        return SecondTouch(cls(capacity), capacity)
    return cls(capacity)


def _register() -> None:
    from .adaptive import LIRS, LeCaR, WTinyLFU
    from .frequency import LFUDA, LFUHistory, PinnedHot
    from .modern import ARC, S3FIFO, SLRU, Clock, Sieve, TwoQ

    for cls in (Clock, Sieve, S3FIFO, TwoQ, SLRU, ARC, LIRS, WTinyLFU, LeCaR, LFUDA, LFUHistory, PinnedHot):
        POLICIES[cls.name] = cls


_register()
