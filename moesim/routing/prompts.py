"""The prompts file of `moesim trace collect`: JSON lines (token ids, or text) or plain text lines."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .jsonl import read_json_lines


def read_prompts(path) -> list[str | list[int]]:
    """Prompts file: `.jsonl` (one JSON object per line with `input_ids` (token ids) or `prompt`/`text`,
    or a JSON string), or plain text (one prompt per non-empty line)."""
    p = Path(path)
    file = str(path)
    if not p.is_file():
        raise InputError("prompts file not found", file=file)
    out: list[str | list[int]] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, obj in read_json_lines(p, file):
            if isinstance(obj, str):
                out.append(obj)
            elif isinstance(obj, dict) and "input_ids" in obj:
                ids = obj["input_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(t, int) and t >= 0 for t in ids)):
                    raise InputError(f"line {n}: expected a non-empty list of token ids >= 0", file=file,
                                     field="input_ids")
                out.append(ids)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt", obj.get("text")), str):
                out.append(obj.get("prompt", obj.get("text")))
            else:
                raise InputError(f"line {n}: expected a string or an object with 'input_ids', 'prompt' or 'text'",
                                 file=file)
    else:
        try:
            out = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read: {e}", file=file) from None
    if not out:
        raise InputError("no prompts found", file=file)
    return out
