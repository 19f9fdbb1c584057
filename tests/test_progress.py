"""The progress bar of `moesim run`: fed every step's tokens, shown only on a terminal."""
from __future__ import annotations

import io
from pathlib import Path

from moesim.config import load_scenario
from moesim.engine.run import simulate
from moesim.progress import token_progress

ROOT = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_callback_counts_every_processed_token():
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    seen: list[int] = []
    totals: list[int] = []

    def progress(total):
        totals.append(total)
        return seen.append

    res = simulate(sc, progress=progress)
    assert totals == [res.summary["processed_tokens"]]
    assert sum(seen) == res.summary["processed_tokens"] and len(seen) == res.summary["steps"]
    plain = simulate(sc).summary
    assert res.summary == plain  # the bar changes nothing


def test_no_bar_when_piped_or_quiet():
    with token_progress(True, io.StringIO()) as p:
        assert p is None
    with token_progress(False, _Tty()) as p:
        assert p is None


def test_bar_on_a_terminal_shows_tokens_after_the_delay(monkeypatch):
    import moesim.progress as prog

    monkeypatch.setattr(prog, "DELAY_S", 0.0)
    out = _Tty()
    with token_progress(True, out) as p:
        step = p(100)
        step(40)
        step(60)
    assert "simulating" in out.getvalue() and "/100" in out.getvalue() and "tok/s" in out.getvalue()
