"""llama.cpp expert-selection logs -> importer rows (`moesim trace import --format llamacpp`; the accepted
lines and how batches become requests are in `routing.importers`' docstring)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from .import_table import Shape, _Rows

_KV_RE = re.compile(r"\blayer(?:_id|_idx)?\s*[=:]\s*(\d+)\b.*?\bexpert(?:_id|_idx)?s?\s*[=:]\s*\[?\s*"
                    r"(-?\d+(?:\s*[,\s]\s*-?\d+)*)\s*\]?", re.IGNORECASE)
_CSV_RE = re.compile(r"^\s*(\d+)\s*[,;\t]\s*\"?\[?\s*(-?\d+(?:\s*[,\s]\s*-?\d+)*)\s*\]?\"?\s*$")
_REQ_RE = re.compile(r"^\s*#?\s*request(?:_id)?\s*[=:]?\s*(\S+)\s*$", re.IGNORECASE)
_HEADER_RE = re.compile(r"^\s*layer(?:_id|_idx)?\s*[,;\t]\s*expert(?:_id|_idx)?s?\s*$", re.IGNORECASE)


class _Out:
    """The rows being written (parallel lists) and the request being numbered."""

    def __init__(self):
        self.rid, self.tok, self.lay, self.ex, self.labels, self.pre = [], [], [], [], [], []
        self.req = 0


def _llamacpp_rows(path: Path, file: str, shape: Shape, prompt_len, first_layer: int | None) -> tuple[_Rows, str]:
    requests = _records(path, file)
    lo = first_layer if first_layer is not None else min(rec[0] for req in requests for rec in req)
    out = _Out()
    for req in requests:
        _request_rows(_batches(req, lo, shape.num_layers, file), lo, shape, file, out)
        out.req += 1
    rows = _Rows(np.array(out.rid, dtype=np.int64), np.array(out.tok, dtype=np.int64),
                 np.array(out.lay, dtype=np.int64), out.ex, lambda i: out.labels[i],
                 None if prompt_len is not None else out.pre)
    return rows, f"first layer {lo}"


def _records(path: Path, file: str) -> list[list[list]]:
    """Lines -> per request, records [layer, ids, first line]; consecutive lines of one layer are joined."""
    requests: list[list[list]] = [[]]
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"cannot read: {e}", file=file) from None
    with f:
        for n, line in enumerate(f, 1):
            m = _KV_RE.search(line) or _CSV_RE.match(line)
            if m is None:
                if _REQ_RE.match(line):
                    if requests[-1]:
                        requests.append([])
                    continue
                if _HEADER_RE.match(line) or not re.search(r"layer_id|expert_ids", line, re.IGNORECASE):
                    continue  # header or log noise
                raise InputError(f"line {n}: cannot read 'layer_id=<int> expert_ids=<int>,<int>...' here: "
                                 f"{line.strip()[:120]!r}", file=file)
            layer = int(m.group(1))
            ids = [int(x) for x in re.split(r"[\s,]+", m.group(2).strip()) if x]
            cur = requests[-1]
            if cur and cur[-1][0] == layer:
                cur[-1][1].extend(ids)
            else:
                cur.append([layer, ids, n])
    requests = [r for r in requests if r]
    if not requests:
        raise InputError("no 'layer_id=... expert_ids=...' lines found", file=file)
    return requests


def _batches(req: list[list], lo: int, L: int, file: str) -> list[list]:
    """One request's records -> batches: runs of layers lo..lo+L-1 in order."""
    batches: list[list] = []
    prev = None
    for rec in req:
        idx = rec[0] - lo
        if idx < 0 or idx >= L:
            raise InputError(f"line {rec[2]}: layer {rec[0]} out of range: expected {lo}..{lo + L - 1} "
                             f"(num_layers={L}, first layer {lo})", file=file, field="layer_id")
        if prev is None or idx <= prev:
            batches.append([])
        elif idx != prev + 1:
            raise InputError(f"line {rec[2]}: expected layer {lo + prev + 1} after layer {lo + prev} (each batch "
                             f"lists layers {lo}..{lo + L - 1} in order), found {rec[0]}", file=file,
                             field="layer_id")
        batches[-1].append(rec)
        prev = idx
    return batches


def _batch_tokens(b: list, lo: int, L: int, K: int, file: str) -> int:
    """The number of tokens of batch `b` (every layer lists top_k ids per token, the same count)."""
    if len(b) != L:
        last = b[-1]
        raise InputError(f"line {last[2]}: batch ends after layer {last[0]}: expected layers {lo}..{lo + L - 1} "
                         f"(num_layers={L})", file=file, field="layer_id")
    counts = {len(rec[1]) for rec in b}
    c = len(b[0][1])
    if len(counts) != 1 or c % K or c == 0:
        bad = next(rec for rec in b if len(rec[1]) != c or c % K or c == 0)
        raise InputError(f"line {bad[2]}: layer {bad[0]} has {len(bad[1])} expert ids; expected top_k={K} "
                         f"per token and the same token count on every layer of the batch ({c} ids on "
                         f"layer {b[0][0]})", file=file, field="expert_ids")
    return c // K


def _request_rows(batches: list[list], lo: int, shape: Shape, file: str, out: _Out) -> None:
    """Write a request's batches as rows; a multi-token batch after single-token batches starts a new request."""
    L, K = shape.num_layers, shape.top_k
    token = 0
    seen_decode = False
    first_batch = True
    for b in batches:
        ntok = _batch_tokens(b, lo, L, K, file)
        if ntok > 1 and seen_decode:
            out.req += 1
            token, seen_decode, first_batch = 0, False, True
        is_prefill = first_batch or (ntok > 1 and not seen_decode)
        if not is_prefill:
            seen_decode = True
        first_batch = False
        arr = np.array([rec[1] for rec in b], dtype=np.int64).reshape(L, ntok, K).transpose(1, 0, 2)
        for j in range(ntok):
            for li, rec in enumerate(b):
                out.rid.append(out.req)
                out.tok.append(token + j)
                out.lay.append(li)
                out.ex.append(arr[j, li].tolist())
                out.labels.append(f"line {rec[2]} (token {j} of the batch)")
                out.pre.append("prefill" if is_prefill else "decode")
        token += ntok
