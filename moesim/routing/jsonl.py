"""JSON-lines input, read one way for every reader in `routing` (importers, collect's prompts file):
(line number, value) per non-blank line, and an InputError naming the file and the line when it is bad."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import InputError


def json_lines(lines: Iterable[str], file: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON-lines text; InputError on bad JSON."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"line {n}: not JSON: {e.msg}", file=file) from None


def read_json_lines(path: Path, file: str) -> list[tuple[int, object]]:
    """`json_lines` of the file at `path`; an unreadable file is an InputError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(json_lines(f, file))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read: {e}", file=file) from None
