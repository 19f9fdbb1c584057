"""The rows every run's table shows come from one function (cli.util.run_rows): `moesim run`'s
wording and rounding by default, `moesim replay`'s shorter table with REPLAY_STYLE; both commands
print them."""
from __future__ import annotations

from pathlib import Path

from moesim.cli.replay import _print_run
from moesim.cli.run import _print_summary
from moesim.cli.util import REPLAY_STYLE, run_rows

LAT = {"mean": 12.3456, "p50": 11.0, "p99": 20.5}
S = {"tokens_per_s": 43.74575, "makespan_s": 11.88694, "ttft_ms": LAT, "tpot_ms": {"mean": None},
     "gpu_hit_rate": 0.5743, "dram_hit_rate": None, "hits": 30913, "late_hits": 2, "misses": 22898,
     "stall_s": 10.26481, "stall_fraction": 0.8641, "gpu_utilization": 0.136, "pcie_utilization": 0.983,
     "bytes_pcie": 288.124e9, "bytes_disk": 0.0, "prefetch": {"issued": 5, "used": 4, "late": 1, "wasted": 0},
     "dedup_ratio": 0.453}


def test_run_rows_as_moesim_run_prints_them():
    assert run_rows(S) == [
        ("tokens/s", "43.7"), ("TTFT ms mean", "12.35 (p50 11.00, p99 20.50)"), ("TPOT ms mean", "-"),
        ("makespan", "11.8869 s"), ("GPU hit rate", "57.4%"), ("DRAM hit rate", "-"),
        ("hits / late / misses", "30913 / 2 / 22898"), ("stall", "10.2648 s (86.4% of makespan)"),
        ("GPU / PCIe utilisation", "13.6% / 98.3%"), ("bytes over PCIe / disk", "288.124 GB / 0.000 GB"),
        ("prefetch issued/used/late/wasted", "5/4/1/0"), ("dedup ratio", "45.3%")]


def test_run_rows_as_moesim_replay_prints_them():
    assert run_rows(S, REPLAY_STYLE) == [
        ("tokens/s", "43.75"), ("makespan", "11.887 s"), ("TTFT ms mean", "12.35 (p50 11.00, p99 20.50)"),
        ("TPOT ms mean", "-"), ("cache hit rate", "57.4%"), ("DRAM hit rate", "-"),
        ("hits / late / misses", "30913 / 2 / 22898"), ("stall", "10.265 s (86.4%)"),
        ("bytes link / disk", "288.124 GB / 0.000 GB"), ("prefetch issued/used/late/wasted", "5/4/1/0")]


def test_both_commands_print_the_rows(capsys):
    sc = {"name": "x", "model": {"name": "m", "num_layers": 1}, "hardware": {"name": "h"},
          "predictor": {"name": "p"}, "batch": {"size": 1}}
    s = {**S, "scenario": sc, "gpu_cache_experts": 3, "steps": 1}
    for show, style in ((_print_summary, None), (_print_run, REPLAY_STYLE)):
        show(s, Path("out"))
        text = capsys.readouterr().out
        for k, v in (run_rows(s) if style is None else run_rows(s, style)):
            assert k in text and v in text, (k, v)
