"""Reading one value of an imported routing row: expert id lists, score lists, integers and request ids,
each error naming the file, the row and the field."""
from __future__ import annotations

import json
import math
import re

import numpy as np

from ..errors import InputError

_SPLIT = re.compile(r"[\s,;]+")


def _int_list(v, what: str, where: str, file: str) -> list[int]:
    """'3 17', '3,17', '[3, 17]', [3, 17] -> [3, 17]."""
    if isinstance(v, (list, tuple, np.ndarray)):
        out = []
        for x in v:
            if isinstance(x, bool) or not (isinstance(x, (int, np.integer))
                                           or (isinstance(x, float) and x.is_integer())):
                raise InputError(f"{where}: expected integer expert ids, found {x!r}", file=file, field=what)
            out.append(int(x))
        return out
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                return _int_list(json.loads(s), what, where, file)
            except json.JSONDecodeError:
                raise InputError(f"{where}: not a JSON list: {v!r}", file=file, field=what) from None
        parts = [p for p in _SPLIT.split(s) if p]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise InputError(f"{where}: expected integer expert ids like '3 17' or [3, 17], found {v!r}", file=file,
                             field=what) from None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return [int(v)]
    raise InputError(f"{where}: expected a list of expert ids, found {v!r}", file=file, field=what)


def _float_list(v, what: str, where: str, file: str) -> list[float]:
    if v is None or (isinstance(v, str) and not v.strip()):
        return []
    if isinstance(v, str):
        s = v.strip()
        try:
            vals = json.loads(s) if s.startswith("[") else [float(p) for p in _SPLIT.split(s) if p]
        except (ValueError, json.JSONDecodeError):
            raise InputError(f"{where}: expected numbers, found {v!r}", file=file, field=what) from None
    elif isinstance(v, (int, float)):
        vals = [v]
    else:
        vals = list(v)
    try:
        out = [float(x) for x in vals]
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected numbers, found {v!r}", file=file, field=what) from None
    if not all(math.isfinite(x) for x in out):
        raise InputError(f"{where}: scores must be finite, found {v!r}", file=file, field=what)
    return out


def _int(v, what: str, where: str, file: str) -> int:
    if isinstance(v, bool):
        raise InputError(f"{where}: expected an integer, found {v!r}", file=file, field=what)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected an integer, found {v!r}", file=file, field=what) from None


class _RequestIds:
    """Integer request ids are kept; if any id is not an integer, all are numbered in order of first
    appearance."""

    def __init__(self, raw: list):
        def as_int(v):
            if isinstance(v, bool):
                return None
            if isinstance(v, (int, np.integer)):
                return int(v)
            try:
                return int(str(v).strip())
            except ValueError:
                return None

        ints = [as_int(v) for v in raw]
        self.renumbered = any(i is None for i in ints)
        if self.renumbered:
            seen: dict = {}
            self.ids = np.array([seen.setdefault(str(v), len(seen)) for v in raw], dtype=np.int64)
        else:
            self.ids = np.array(ints, dtype=np.int64)
