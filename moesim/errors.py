"""One exception type for bad input: the CLI prints its message and exits with status 2."""
from __future__ import annotations


class InputError(Exception):
    """Bad user input (file, field, value). `str()` is the one-line message users see."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        self.detail = message
        where = ": ".join(p for p in (str(file) if file else None, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


def pydantic_message(err, *, file: str | None = None, prefix: str = "") -> InputError:
    """Turn a pydantic ValidationError into an InputError naming the first bad field."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e.get("loc", ()) if not isinstance(p, int) or True)
    field = ".".join(p for p in (prefix, loc) if p)
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown key"
    got = e.get("input")
    if got is not None and e.get("type") != "extra_forbidden" and not isinstance(got, dict):
        shown = repr(got)
        msg += f" (got {shown if len(shown) <= 80 else shown[:76] + ' ...'})"   # a long value stays one short line
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return InputError(msg, file=file, field=field or None)


def build(cls, data, *, file: str | None = None, prefix: str = ""):
    """`cls(**data)` for a pydantic model read from a file: a non-mapping, a validation error or a
    non-string key is an InputError naming the file and the field."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise InputError(f"expected a mapping, got {type(data).__name__}", file=file, field=prefix or None)
    try:
        return cls(**data)
    except ValidationError as e:
        raise pydantic_message(e, file=file, prefix=prefix) from None
    except TypeError as e:  # e.g. a non-string key
        raise InputError(str(e), file=file, field=prefix or None) from None
