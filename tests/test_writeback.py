"""Write-back of evicted experts (runtime `evict_writeback`, issue 15) against closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from moesim import simulate
from moesim.cli import main
from moesim.hardware.costs import transfer_s
from tests.helpers import TINY_MODEL, fixed_profile, scenario, write_routing

A, C = 0.1e-3, 0.2e-3           # attention and expert-compute seconds (fixed tables)
EB = 3 * 256 * 512 * 2          # tiny expert in bf16
T = transfer_s(EB, 1.0, 10.0)   # one expert over the fixture's H2D link
L = TINY_MODEL["num_layers"]


def _wb(mode):
    return {"evict_writeback": mode, "source": {"evict_writeback": "test fixture"}}


def _d2h_profile(gbps=1.0, lat_us=10.0):
    hw = fixed_profile()
    hw["pcie_d2h"] = {"bandwidth_gbps": gbps, "latency_us": lat_us, "copy_engines": 1,
                      "source": {k: "test fixture" for k in ("bandwidth_gbps", "latency_us", "copy_engines")}}
    return hw


def _fresh(tmp_path, n, K=1, E=256):
    """One request of n tokens (1 prompt); every (token, layer) needs K experts never seen before."""
    routing = np.arange(n * L * K, dtype=np.int16).reshape(1, n, L, K) % E
    return write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=E), {**TINY_MODEL,
                                                                                         "num_experts": E, "top_k": K}


def test_one_miss_on_a_one_slot_link_costs_two_copies(tmp_path):
    """same_stream, one expert slot: every load but the first evicts, so its copy and the
    write-back run back to back on the one link slot and the expert lands after both: a layer is
    A + 2T + C (the very first load evicts nothing: A + T + C)."""
    n = 5
    trace, model = _fresh(tmp_path, n)
    base = simulate(scenario(trace, model=model))
    res = simulate(scenario(trace, model=model, runtime=_wb("same_stream")), record_events=True)
    s = res.summary
    assert base.summary["makespan_s"] == pytest.approx(n * L * (A + T + C), rel=1e-9)
    assert s["makespan_s"] == pytest.approx(n * L * (A + 2 * T + C) - T, rel=1e-9)
    assert s["evictions"]["gpu"] == n * L - 1
    assert s["writeback"] == {"mode": "same_stream", "link": "pcie", "copies": n * L - 1,
                              "bytes": (n * L - 1) * EB, "busy_s": pytest.approx((n * L - 1) * T, rel=1e-9)}
    assert s["transfers_pcie"] == 2 * n * L - 1 and s["bytes_pcie"] == (2 * n * L - 1) * EB
    ev = res.events[res.events["resource"] == "pcie"].sort_values("start_s")
    # the write-back of expert k-1 follows the load of expert k: keys alternate new, evicted
    keys = (ev["layer"].to_numpy().astype(int) * 256 + ev["expert"].to_numpy()).tolist()
    seq = [layer * 256 + t * L + layer for t in range(n) for layer in range(L)]  # the accesses, in order
    assert keys == [seq[0]] + [x for i in range(1, n * L) for x in (seq[i], seq[i - 1])]


def test_the_write_back_runs_before_copies_queued_behind_it(tmp_path):
    """same_stream, two misses per layer, two expert slots, one link slot: the stream runs
    in(a) out(a') in(b) out(b'), so the second expert lands after four copies: A + 4T + C."""
    n = 4
    trace, model = _fresh(tmp_path, n, K=2)
    res = simulate(scenario(trace, model=model, gpu={"capacity_experts": 2}, runtime=_wb("same_stream")))
    assert res.summary["makespan_s"] == pytest.approx(n * L * (A + 4 * T + C) - 2 * T, rel=1e-9)


def test_a_copy_with_no_evictable_slot_writes_an_expert_back_too(tmp_path):
    """A 2-token prefill, one expert slot: each layer's second expert finds the slot pinned and is
    copied through a transient buffer (bypass); the stack swaps it in all the same, so it costs a
    copy back. Layer 0 (empty slot): in(a) in(b) out(b) = 3T; later layers in(a) out(a') in(b)
    out(b) = 4T."""
    routing = np.array([[[[2 * layer], [2 * layer + 1]][t] for layer in range(L)] for t in range(2)],
                       dtype=np.int16).reshape(1, 2, L, 1)
    trace = write_routing(tmp_path / "p.parquet", routing, prompt_len=2, num_experts=16)
    base = simulate(scenario(trace))
    res = simulate(scenario(trace, runtime=_wb("same_stream")))
    assert base.summary["bypass_loads"] == res.summary["bypass_loads"] == L
    assert base.summary["makespan_s"] == pytest.approx(L * (A + 2 * T + C), rel=1e-9)
    assert res.summary["makespan_s"] == pytest.approx(L * (A + C) + (3 + 4 * (L - 1)) * T, rel=1e-9)
    assert res.summary["writeback"]["copies"] == 2 * L - 1


def test_a_separate_d2h_stream_overlaps_the_write_back(tmp_path):
    """d2h_stream on a D2H link as fast as H2D: each write-back runs while its load's copy does
    (full duplex), so the timing is the no-write-back model's, and the copies are on pcie_d2h."""
    n = 4
    trace, model = _fresh(tmp_path, n, K=2)
    kw = dict(model=model, gpu={"capacity_experts": 2}, hardware=_d2h_profile())
    base = simulate(scenario(trace, **kw))
    res = simulate(scenario(trace, runtime=_wb("d2h_stream"), **kw))
    assert res.summary["makespan_s"] == pytest.approx(n * L * (A + 2 * T + C), rel=1e-9)
    assert res.summary["makespan_s"] == pytest.approx(base.summary["makespan_s"], rel=1e-12)
    assert res.summary["writeback"]["link"] == "pcie_d2h"
    assert res.summary["writeback"]["copies"] == n * L * 2 - 2
    assert res.summary["transfers_pcie"] == base.summary["transfers_pcie"] == n * L * 2


def test_a_slower_d2h_link_delays_the_swap(tmp_path):
    """d2h_stream with D2H at half the H2D rate: a load lands when its write-back does, so a
    layer is A + T_d2h + C (the first load evicts nothing: A + T + C)."""
    n = 5
    T2 = transfer_s(EB, 0.5, 10.0)
    trace, model = _fresh(tmp_path, n)
    res = simulate(scenario(trace, model=model, hardware=_d2h_profile(gbps=0.5), runtime=_wb("d2h_stream")))
    assert res.summary["makespan_s"] == pytest.approx(n * L * (A + T2 + C) - (T2 - T), rel=1e-9)


def test_the_fast_path_refuses_the_write_back(tmp_path):
    trace, model = _fresh(tmp_path, 3)
    res = simulate(scenario(trace, model=model, runtime=_wb("same_stream")))
    assert res.engine == {"engine": "simpy", "reason": "the write-back of evicted experts"}
    assert simulate(scenario(trace, model=model)).engine["engine"] == "fast"


def test_none_leaves_the_runtime_model_unchanged(tmp_path):
    trace, model = _fresh(tmp_path, 4)
    rt = {"layer_host_us": 300.0, "source": {"layer_host_us": "test fixture"}}
    a = simulate(scenario(trace, model=model, runtime=rt))
    b = simulate(scenario(trace, model=model, runtime={**rt, "evict_writeback": "none"}))
    assert a.summary == b.summary and "writeback" not in a.summary


def _write(tmp_path, runtime, hardware=None):
    trace, model = _fresh(tmp_path, 3)
    sc = {"model": model, "hardware": hardware or fixed_profile(), "trace": str(trace),
          "cache": {"gpu": {"capacity_experts": 1}}, "runtime": runtime}
    p = tmp_path / "sc.yaml"
    p.write_text(yaml.safe_dump(sc))
    return p


@pytest.mark.parametrize("runtime, field", [
    ({"evict_writeback": "always", "source": {"evict_writeback": "x"}}, "runtime.evict_writeback"),
    ({"evict_writeback": "same_stream"}, "evict_writeback has no entry in source"),
    (_wb("d2h_stream"), "runtime.evict_writeback"),  # the fixture profile has no pcie_d2h link
])
def test_bad_write_back_exits_2_naming_file_and_field(tmp_path, runtime, field):
    p = _write(tmp_path, runtime)
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "out"), "--quiet", "--no-report"])
    assert r.exit_code == 2, r.output
    assert str(p) in r.output and field in r.output and "Traceback" not in r.output


def test_d2h_stream_echoes_the_d2h_link(tmp_path):
    p = _write(tmp_path, _wb("d2h_stream"), hardware=_d2h_profile())
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(out), "--quiet", "--no-report"])
    assert r.exit_code == 0, r.output
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["scenario"]["hardware"]["pcie_d2h"]["bandwidth_gbps"] == 1.0
    assert s["scenario"]["runtime"]["evict_writeback"] == "d2h_stream" and s["writeback"]["copies"] == 3 * L - 1
