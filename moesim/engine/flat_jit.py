"""The flat prefetch path's moves, compiled (numba): the GPU tier's slots and pins, the PCIe link's
queues and copies, and the loads, on integer and float arrays (engine/flat_link.py owns them and
calls these; LoadChain, PinLedger, Tier and Channel are the general versions these follow,
decision for decision).

The state is two 2-D arrays, `Z` (int64) and `X` (float64), whose rows are named below: one row of
scalars each, rows indexed by key (layer * E + expert), by GPU-tier partition, by load id (a pool
with a free list) and a few queues. Keys are dense and small, so every set and dict of the Python
version is a row here:
- the GPU tier: per partition a doubly linked list of the keys holding a slot, in eviction order
  (LRU touches move a key to its tail), and a READY flag per key;
- a queued prefetch is a key in the prefetch queue (a doubly linked list, so a promotion removes
  it at once) with its target; a key has at most one load or queued prefetch at a time;
- copies in flight end in the order they start (every copy is one expert and takes `d` seconds),
  so they are a ring; `seq` numbers copies and the driver's wake-ups as SimPy's event ids would,
  which decides ties at equal times.
Pins are one count per key; `stale` holds the pins of loads that left without a slot, whose
unpins are no-ops (PinLedger).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .channels import DEMAND, PREFETCH  # (the events' priorities)

# ---- Z rows ------------------------------------------------------------------------------------
S = 0  # scalars (columns below)
PINS, STALE, KST, KLID, QT, QN, QP, ON, OP, INOD, READY, UNUSED = range(1, 13)  # per key
PH, PT, PSZ, PCAP = range(13, 17)  # per partition: list head, tail, size, capacity
LKEY, LPF, LPRIO, LCNT, LBYP, LWAIT, LPEND, LSEQ, LNEXT = range(17, 26)  # per load id
DQ, FLY, PEND, PINNED = range(26, 30)  # rings and the current layer's scratch
Z_ROWS = 30
# KST: what a key has on its way
NONE, QUEUED, LOADING = 0, 1, 2

# S columns
(BUSY, SLOTS, TRANSFERS, SEQ, LEFT, WAKE, GATED, INFLIGHT, C_BYPASS, C_DROPPED, C_WASTED, C_EVICT,
 C_ISSUED, C_USED, C_LATE, C_SAVED, PQH, PQT, DQH, DQN, FLH, FLN, FREE, NPEND, NPIN, PERLAYER, LRU_,
 NE, STALEN, MAXINF, DQCAP, EVN, LOG, PROTECT, BUDGETS, NPR, NPB, EBI) = range(38)
N_SCALARS = 38

# ---- X rows ------------------------------------------------------------------------------------
XS = 0  # scalars
NOW, BUSYTIME, DUR, MAXBYTES = range(4)
LSTART, LEND, LDONE, PENDC = range(1, 5)  # per load id; the current layer's kernel seconds
X_ROWS = 5

# event buffer rows (EI int64: key, prio; EF float64: start, end); PR (int64): rows 0-1 the
# protections held (target code, key), rows 2-3 each target's prefetch count (max_bytes_per_layer)


@njit(cache=True, nogil=True)
def _part(Z, key):
    return key // Z[S, NE] if Z[S, PERLAYER] else 0


@njit(cache=True, nogil=True)
def _unlink(Z, nx, pv, hr, hc, tr, tc, k):
    """Take `k` out of a doubly linked list: its next and previous keys in rows nx and pv, the
    list's head at Z[hr, hc] and its tail at Z[tr, tc]."""
    n, p = Z[nx, k], Z[pv, k]
    if p >= 0:
        Z[nx, p] = n
    else:
        Z[hr, hc] = n
    if n >= 0:
        Z[pv, n] = p
    else:
        Z[tr, tc] = p


@njit(cache=True, nogil=True)
def _link(Z, nx, pv, hr, hc, tr, tc, k):
    """Append `k` at the tail of a doubly linked list (as _unlink)."""
    t = Z[tr, tc]
    Z[pv, k] = t
    Z[nx, k] = -1
    if t >= 0:
        Z[nx, t] = k
    else:
        Z[hr, hc] = k
    Z[tr, tc] = k


@njit(cache=True, nogil=True)
def _od_remove(Z, p, k):
    _unlink(Z, ON, OP, PH, p, PT, p, k)
    Z[INOD, k] = 0
    Z[PSZ, p] -= 1


@njit(cache=True, nogil=True)
def _od_append(Z, p, k):
    _link(Z, ON, OP, PH, p, PT, p, k)
    Z[INOD, k] = 1
    Z[PSZ, p] += 1


@njit(cache=True, nogil=True)
def _pq_append(Z, k):
    _link(Z, QN, QP, S, PQH, S, PQT, k)


@njit(cache=True, nogil=True)
def _pq_remove(Z, k):
    _unlink(Z, QN, QP, S, PQH, S, PQT, k)


@njit(cache=True, nogil=True)
def _new_load(Z, X, key, prefetch):
    lid = Z[S, FREE]
    Z[S, FREE] = Z[LNEXT, lid]
    Z[LKEY, lid] = key
    Z[LPF, lid] = prefetch
    Z[LPRIO, lid] = PREFETCH if prefetch else DEMAND
    Z[LCNT, lid] = prefetch  # issued as a prefetch: counts against max_inflight until it lands
    Z[LBYP, lid] = 0
    Z[LWAIT, lid] = 0
    Z[LPEND, lid] = 0
    X[LDONE, lid] = -1.0
    X[LSTART, lid] = -1.0
    Z[KST, key] = LOADING
    Z[KLID, key] = lid
    return lid


@njit(cache=True, nogil=True)
def _free_load(Z, lid):
    Z[LNEXT, lid] = Z[S, FREE]
    Z[S, FREE] = lid


@njit(cache=True, nogil=True)
def _dq_push(Z, lid):
    Z[DQ, (Z[S, DQH] + Z[S, DQN]) % Z[S, DQCAP]] = lid
    Z[S, DQN] += 1


@njit(cache=True, nogil=True)
def _slot(Z, key):
    """Tier.reserve at a copy's start: a GPU slot for `key`, evicting the oldest READY key not
    pinned when the tier is full; False, changing nothing, when none can be evicted."""
    p = _part(Z, key)
    if Z[PSZ, p] >= Z[PCAP, p]:
        v = -1
        if Z[PCAP, p]:
            k = Z[PH, p]
            while k >= 0:  # (IN_FLIGHT keys are not READY)
                if Z[PINS, k] == 0 and Z[READY, k]:
                    v = k
                    break
                k = Z[ON, k]
        if v < 0:
            return False
        _od_remove(Z, p, v)
        Z[READY, v] = 0
        if Z[UNUSED, v]:
            Z[UNUSED, v] = 0
            Z[S, C_WASTED] += 1
        Z[S, C_EVICT] += 1
    _od_append(Z, p, key)  # (the pins waiting on its load are the slot's now)
    return True


@njit(cache=True, nogil=True)
def _forget(Z, key):
    """The load of `key` leaves without a slot: its waiting pins go with it (stale: their unpins
    become no-ops)."""
    Z[KST, key] = NONE
    n = Z[PINS, key]
    if n:
        if Z[STALE, key] == 0:
            Z[S, STALEN] += 1
        Z[STALE, key] += n
        Z[PINS, key] = 0


@njit(cache=True, nogil=True)
def _dispatch(Z, X):
    """Start queued copies on free slots: demand first; a stale or slotless prefetch is dropped."""
    now = X[XS, NOW]
    while Z[S, BUSY] < Z[S, SLOTS]:
        if Z[S, DQN]:
            lid = Z[DQ, Z[S, DQH]]
            Z[S, DQH] = (Z[S, DQH] + 1) % Z[S, DQCAP]
            Z[S, DQN] -= 1
            key = Z[LKEY, lid]
            if not _slot(Z, key):  # no slot: the demand copy bypasses the cache
                Z[LBYP, lid] = 1
                Z[S, C_BYPASS] += 1
                _forget(Z, key)
        else:
            gated, dropped, lid = Z[S, GATED], 0, -1
            while Z[S, PQH] >= 0:
                key = Z[S, PQH]
                _pq_remove(Z, key)
                if Z[QT, key] > gated and _slot(Z, key):
                    lid = _new_load(Z, X, key, 1)
                    break
                if Z[PINS, key]:
                    _forget(Z, key)
                else:
                    Z[KST, key] = NONE
                dropped += 1
            Z[S, C_DROPPED] += dropped
            Z[S, INFLIGHT] -= dropped
            if lid < 0:
                return
        Z[S, BUSY] += 1
        X[LSTART, lid] = now
        X[LEND, lid] = now + X[XS, DUR]
        Z[S, SEQ] += 1
        Z[LSEQ, lid] = Z[S, SEQ]
        Z[FLY, (Z[S, FLH] + Z[S, FLN]) % Z[S, SLOTS]] = lid
        Z[S, FLN] += 1


@njit(cache=True, nogil=True)
def _finish(Z, X, EI, EF, lid):
    """The copy of `lid` has ended (now): free its link slot, land it, start what is queued."""
    Z[S, BUSY] -= 1
    X[XS, BUSYTIME] += X[LEND, lid] - X[LSTART, lid]
    Z[S, TRANSFERS] += 1
    if Z[S, LOG]:
        n = Z[S, EVN]
        EI[0, n], EI[1, n] = Z[LKEY, lid], Z[LPRIO, lid]
        EF[0, n], EF[1, n] = X[LSTART, lid], X[LEND, lid]
        Z[S, EVN] = n + 1
    X[LDONE, lid] = X[LEND, lid]
    if Z[LCNT, lid]:
        Z[S, INFLIGHT] -= 1
    if not Z[LBYP, lid]:
        key = Z[LKEY, lid]
        Z[READY, key] = 1
        Z[KST, key] = NONE
        if Z[LPF, lid]:
            Z[UNUSED, key] = 1
    if Z[LWAIT, lid]:
        Z[S, LEFT] -= 1
        if Z[S, LEFT] == 0:
            Z[S, SEQ] += 1
            Z[S, WAKE] = Z[S, SEQ]
    if not Z[LPEND, lid]:  # (a pending load is read by its layer's kernels, then freed)
        _free_load(Z, lid)
    if Z[S, DQN] or Z[S, PQH] >= 0:
        _dispatch(Z, X)


@njit(cache=True, nogil=True)
def _fly_pop(Z):
    lid = Z[FLY, Z[S, FLH]]
    Z[S, FLH] = (Z[S, FLH] + 1) % Z[S, SLOTS]
    Z[S, FLN] -= 1
    return lid


@njit(cache=True, nogil=True)
def sleep(Z, X, EI, EF, dt):
    """The driver sleeps `dt`: copies that end before its wake-up (or at it, made before it) land.
    Returns the time."""
    Z[S, SEQ] += 1
    ws, t = Z[S, SEQ], X[XS, NOW] + dt
    while Z[S, FLN]:
        lid = Z[FLY, Z[S, FLH]]
        e = X[LEND, lid]
        if e < t or (e == t and Z[LSEQ, lid] < ws):
            _fly_pop(Z)
            X[XS, NOW] = e
            _finish(Z, X, EI, EF, lid)
        else:
            break
    X[XS, NOW] = t
    return t


@njit(cache=True, nogil=True)
def drain(Z, X, EI, EF):
    """The copies still in flight at the end (and those they start), as SimPy's run goes on."""
    while Z[S, FLN]:
        lid = _fly_pop(Z)
        X[XS, NOW] = X[LEND, lid]
        _finish(Z, X, EI, EF, lid)
    return X[XS, NOW]


@njit(cache=True, nogil=True)
def access(Z, X, keys, counts, costs, lo, hi, busy):
    """LoadChain._access_layer with dedup: a hit is touched and pinned (its kernel seconds added to
    `busy`, in access order), a key on its way waited for (a queued prefetch promoted to the demand
    queue), a miss queues a demand load. The loads to wait for and the keys pinned are kept in the
    PEND and PINNED rows for `kernels`. Returns (hits, late, misses, busy)."""
    hits = late = misses = saved = npend = npin = 0
    lru = Z[S, LRU_]
    for i in range(lo, hi):
        key, c = keys[i], costs[i]
        if Z[READY, key]:
            if lru:
                p = _part(Z, key)
                if Z[PT, p] != key:
                    _od_remove(Z, p, key)
                    _od_append(Z, p, key)
            Z[PINS, key] += 1
            Z[PINNED, npin] = key
            npin += 1
            busy += c
            hits += 1
            if Z[UNUSED, key]:
                Z[UNUSED, key] = 0
                Z[S, C_USED] += 1
            continue
        saved += counts[i] - 1  # without dedup each further token would copy it again
        st = Z[KST, key]
        if st != NONE:  # on its way: wait for it
            late += 1
            if st == QUEUED:  # a queued prefetch: promoted (Channel.promote) to the demand queue
                Z[S, C_LATE] += 1
                _pq_remove(Z, key)
                lid = _new_load(Z, X, key, 0)
                Z[LCNT, lid] = 1
                _dq_push(Z, lid)
                if Z[S, BUSY] < Z[S, SLOTS]:
                    _dispatch(Z, X)
            else:
                lid = Z[KLID, key]
                if Z[LPF, lid]:  # copying already: it stays a prefetch copy on the link
                    Z[S, C_LATE] += 1
                    Z[LPF, lid] = 0
        else:
            misses += 1
            lid = _new_load(Z, X, key, 0)
            _dq_push(Z, lid)
            if Z[S, BUSY] < Z[S, SLOTS]:
                _dispatch(Z, X)
        if not Z[LBYP, lid]:  # (a bypassed copy goes through a transient buffer: not cached, not pinned)
            Z[PINS, key] += 1
            Z[PINNED, npin] = key
            npin += 1
        Z[PEND, npend] = lid
        X[PENDC, npend] = c
        Z[LPEND, lid] = 1
        npend += 1
    Z[S, C_SAVED] += saved
    Z[S, NPEND], Z[S, NPIN] = npend, npin
    return hits, late, misses, busy


@njit(cache=True, nogil=True)
def _wait_loads(Z, X, EI, EF, npend):
    """Land copies until every pending load has, then those before the driver's wake-up."""
    left = 0
    for i in range(npend):
        lid = Z[PEND, i]
        if X[LDONE, lid] < 0:
            Z[LWAIT, lid] = 1
            left += 1
    if left == 0:
        return
    Z[S, LEFT], Z[S, WAKE] = left, -1
    while Z[S, WAKE] < 0:
        lid = _fly_pop(Z)
        X[XS, NOW] = X[LEND, lid]
        _finish(Z, X, EI, EF, lid)
    t, ws = X[XS, NOW], Z[S, WAKE]
    while Z[S, FLN]:
        lid = Z[FLY, Z[S, FLH]]
        if X[LEND, lid] == t and Z[LSEQ, lid] < ws:
            _fly_pop(Z)
            _finish(Z, X, EI, EF, lid)
        else:
            break


@njit(cache=True, nogil=True)
def kernels(Z, X, EI, EF, t_gate, busy):
    """Simulation._layer's kernels, then its unpins: the hits' (`busy` seconds from the gate), then
    each loaded expert's once its load has landed, in landing order (ties: access order); the
    driver sleeps until the last ends. Returns (busy seconds, the time, prefetches issued so far)."""
    cursor = t_gate + busy
    npend = Z[S, NPEND]
    if npend:
        _wait_loads(Z, X, EI, EF, npend)
        for i in range(1, npend):  # stable insertion sort of the pending loads by landing time
            lid, c = Z[PEND, i], X[PENDC, i]
            d = X[LDONE, lid]
            j = i - 1
            while j >= 0 and X[LDONE, Z[PEND, j]] > d:
                Z[PEND, j + 1] = Z[PEND, j]
                X[PENDC, j + 1] = X[PENDC, j]
                j -= 1
            Z[PEND, j + 1] = lid
            X[PENDC, j + 1] = c
        for i in range(npend):
            lid, c = Z[PEND, i], X[PENDC, i]
            d = X[LDONE, lid]
            cursor = (cursor if cursor >= d else d) + c
            busy += c
            Z[LPEND, lid] = 0
            _free_load(Z, lid)  # (every pending load has landed)
        Z[S, NPEND] = 0
    now = X[XS, NOW]
    if cursor > now:
        now = sleep(Z, X, EI, EF, cursor - now)
    _unpin(Z, Z[PINNED], Z[S, NPIN])  # (PinLedger._layer_done)
    Z[S, NPIN] = 0
    return busy, now, Z[S, C_ISSUED]


@njit(cache=True, nogil=True)
def _unpin(Z, keys, n):
    """PinLedger._unpin_all: each unpin cancels a stale pin first, else one of the key's pins."""
    if Z[S, STALEN] == 0:
        for i in range(n):
            Z[PINS, keys[i]] -= 1
        return
    for i in range(n):
        _unpin_one(Z, keys[i])


@njit(cache=True, nogil=True)
def _budget(Z, X, PR, target):
    """Whether one more prefetch for `target` fits max_inflight and max_bytes_per_layer; if so,
    it is counted against them (the target's prefetch count is kept in PR's rows 2-3)."""
    if Z[S, MAXINF] >= 0 and Z[S, INFLIGHT] >= Z[S, MAXINF]:
        return False
    if X[XS, MAXBYTES] >= 0:
        n, j = Z[S, NPB], 0
        while j < n and PR[2, j] != target:
            j += 1
        c = PR[3, j] + 1 if j < n else 1
        if c * Z[S, EBI] > X[XS, MAXBYTES]:  # (bytes: a whole number of experts, exact as LoadChain's sum)
            return False
        if j == n:
            PR[2, j] = target
            Z[S, NPB] = n + 1
        PR[3, j] = c
    Z[S, INFLIGHT] += 1
    return True


@njit(cache=True, nogil=True)
def _gated_budget(Z, PR, target):
    """The gate of `target` forgets its prefetch count (LoadChain: pbytes.pop)."""
    n = Z[S, NPB]
    for j in range(n):
        if PR[2, j] == target:
            PR[2, j], PR[3, j] = PR[2, n - 1], PR[3, n - 1]
            Z[S, NPB] = n - 1
            return


@njit(cache=True, nogil=True)
def _protect(Z, PR, target, key):
    n = Z[S, NPR]
    PR[0, n], PR[1, n] = target, key
    Z[S, NPR] = n + 1


@njit(cache=True, nogil=True)
def _release(Z, PR, upto):
    """Unpin the protections whose target is at or before `upto` (each key's unpins are the same
    move, so their order does not matter), keeping the others in order."""
    n, m = Z[S, NPR], 0
    for j in range(n):
        t, key = PR[0, j], PR[1, j]
        if t <= upto:
            _unpin_one(Z, key)
        else:
            PR[0, m], PR[1, m] = t, key
            m += 1
    Z[S, NPR] = m


@njit(cache=True, nogil=True)
def _unpin_one(Z, key):
    s = Z[STALE, key]
    if s:
        Z[STALE, key] = s - 1
        if s == 1:
            Z[S, STALEN] -= 1
    else:
        Z[PINS, key] -= 1


@njit(cache=True, nogil=True)
def issue_blocks(Z, X, PR, B, i, end):
    """LoadChain._issue for blocks B[i:end], each (target code, n, its n keys), targets after the
    gated one: per target, while no copy can start with protect and no budgets every key is
    pinned and those neither resident nor on their way queued (_issue_held); else key by key
    (_issue_keys). A protected key stays pinned until its target layer has run."""
    protect, budgets = Z[S, PROTECT], Z[S, BUDGETS]
    while i < end:
        target, n = B[i], B[i + 1]
        i += 2
        if protect and not budgets and Z[S, BUSY] >= Z[S, SLOTS]:
            queued = 0
            for key in B[i:i + n]:
                Z[PINS, key] += 1
                _protect(Z, PR, target, key)
                if not Z[READY, key] and Z[KST, key] == NONE:
                    Z[KST, key] = QUEUED
                    Z[QT, key] = target
                    _pq_append(Z, key)
                    queued += 1
            Z[S, C_ISSUED] += queued
        else:
            for key in B[i:i + n]:
                if Z[KST, key] != NONE or Z[READY, key]:  # on its way, or resident
                    if protect:
                        Z[PINS, key] += 1
                        _protect(Z, PR, target, key)
                    continue
                if budgets and not _budget(Z, X, PR, target):
                    continue
                Z[KST, key] = QUEUED
                Z[QT, key] = target
                _pq_append(Z, key)
                Z[S, C_ISSUED] += 1
                if Z[S, BUSY] < Z[S, SLOTS]:
                    _dispatch(Z, X)
                if protect and Z[KST, key] != NONE:  # (a prefetch with no slot to land in was dropped at once)
                    Z[PINS, key] += 1
                    _protect(Z, PR, target, key)
        i += n


@njit(cache=True, nogil=True)
def to_gate(Z, X, EI, EF, PR, B, i, gate_at, dt):
    """Simulation._layer up to its gate: the pre-attention hook's blocks B[i:gate_at] issued, then
    the driver sleeps `dt`. Returns (the gate's time, protections held or targets counted,
    whichever is more)."""
    issue_blocks(Z, X, PR, B, i, gate_at)
    return sleep(Z, X, EI, EF, dt), max(Z[S, NPR], Z[S, NPB])


@njit(cache=True, nogil=True)
def from_gate(Z, X, EI, EF, PR, B, gate_at, end, t_gate, gated, keys, counts, costs, lo, hi, busy, gate_gpu):
    """Simulation._layer from its gate (target code `gated`): the accesses keys[lo:hi], the gate
    hook's blocks B[gate_at:end] issued (`gate_gpu` seconds on the stream), the wait for the loads,
    the kernels, the unpins. Returns (hits, late, misses, busy seconds, the time, prefetches issued
    so far, protections held or targets counted, whichever is more)."""
    Z[S, GATED] = gated
    if Z[S, NPB]:
        _gated_budget(Z, PR, gated)
    hits, late, misses, busy = access(Z, X, keys, counts, costs, lo, hi, busy)
    busy += gate_gpu
    issue_blocks(Z, X, PR, B, gate_at, end)
    busy, now, issued = kernels(Z, X, EI, EF, t_gate, busy)
    if Z[S, NPR]:
        _release(Z, PR, gated)
    return hits, late, misses, busy, now, issued, max(Z[S, NPR], Z[S, NPB])


@njit(cache=True, nogil=True)
def layers(Z, X, EI, EF, PR, B, at, dt, gated, keys, counts, costs, bounds, busy, gate_gpu, issued, F, I):
    """to_gate then from_gate for every MoE layer of a step, in one call: for hooks that could all
    be asked before the step's first sleep (their answers depend on neither the time nor the
    cache). Layer l's hooks' blocks are B[at[2l]:at[2l+1]] (pre-attention) and B[at[2l+1]:at[2l+2]]
    (gate), its accesses keys[bounds[l]:bounds[l+1]], its target code `gated` + l. Writes each
    layer's (start, gate, end, busy, stall) to F[l] and (hits, late, misses, prefetches issued in
    it) to I[l]; returns the protections held or targets counted, whichever is more."""
    held = 0
    for l in range(bounds.shape[0] - 1):
        t0 = X[XS, NOW]
        t_gate, _ = to_gate(Z, X, EI, EF, PR, B, at[2 * l], at[2 * l + 1], dt)
        hits, late, misses, b, now, n, held = from_gate(Z, X, EI, EF, PR, B, at[2 * l + 1], at[2 * l + 2], t_gate,
                                                        gated + l, keys, counts, costs, bounds[l], bounds[l + 1],
                                                        busy, gate_gpu)
        F[l, 0], F[l, 1], F[l, 2], F[l, 3], F[l, 4] = t0, t_gate, now, b, now - t_gate - b
        I[l, 0], I[l, 1], I[l, 2], I[l, 3] = hits, late, misses, n - issued
        issued = n
    return held


# ---- packing a step's gate answers (FlatLink._pack_gates) -------------------------------------------


@njit(cache=True, nogil=True)
def pack_gates(experts, ends, codes, per, gated0, E, L, now, fk, starts, pred):
    """FlatLink._pack of every gate's blocks at once, and LoadChain._gate's scoring of this step's
    layers. Block b (gate b // per) predicts experts[ends[b - 1]:ends[b]] for target code codes[b]
    (step * L + layer); it is kept if not empty and after its gate (code > gated0 + gate; gated0 =
    step * L). The keys predicted for this step's layers are marked in now [L * E] (which holds
    those predicted earlier) and scored against the keys accessed, fk[starts[l]:starts[l + 1]] at
    layer l: per layer, the keys accessed, predicted, and predicted and accessed are added to
    pred [3, L]. Returns (the blocks as _pack appends them to [0]: code, size, keys; each gate's
    start, twice, and their end; the later steps' kept targets: their codes ascending, the ends of
    their keys and their keys, each target's distinct keys ascending)."""
    nb = ends.shape[0]
    total, a = 1, 0
    lo, hi = np.iinfo(np.int64).max, -1
    for b in range(nb):
        if ends[b] > a and codes[b] > gated0 + b // per:
            total += ends[b] - a + 2
            if codes[b] >= gated0 + L:
                lo, hi = min(lo, codes[b]), max(hi, codes[b])
        a = ends[b]
    out = np.zeros(total, dtype=np.int64)
    at = np.empty(2 * (nb // per) + 1, dtype=np.int64)
    span = max(hi - lo + 1, 0)
    mark = np.zeros((span, E), dtype=np.bool_)
    pos, a = 1, 0
    for b in range(nb):
        if b % per == 0:
            at[2 * (b // per)] = at[2 * (b // per) + 1] = pos
        z, c = ends[b], codes[b]
        if z > a and c > gated0 + b // per:
            base = (c % L) * E
            out[pos] = c
            out[pos + 1] = z - a
            for i in range(z - a):
                out[pos + 2 + i] = base + experts[a + i]
                if c < gated0 + L:
                    now[base + experts[a + i]] = True
                else:
                    mark[c - lo, experts[a + i]] = True
            pos += z - a + 2
        a = z
    at[-1] = pos
    tcodes = np.empty(span, dtype=np.int64)
    tends = np.empty(span, dtype=np.int64)
    tkeys = np.empty(span * E, dtype=np.int64)
    nt = nk = 0
    for t in range(span):
        base = ((lo + t) % L) * E
        for e in range(E):
            if mark[t, e]:
                tkeys[nk] = base + e
                nk += 1
        if nk > (tends[nt - 1] if nt else 0):
            tcodes[nt] = lo + t
            tends[nt] = nk
            nt += 1
    for key in range(L * E):
        pred[1, key // E] += now[key]
    for l in range(L):
        pred[0, l] += starts[l + 1] - starts[l]
        for i in range(starts[l], starts[l + 1]):
            if now[fk[i]]:
                pred[2, l] += 1
                now[fk[i]] = False  # (a key accessed twice counts once)
    return out, at, tcodes[:nt], tends[:nt], tkeys[:nk]
