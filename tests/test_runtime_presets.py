"""The shipped runtime presets (runtimes/*.yaml): every field written in one cites where it comes
from, and the moe-infinity preset's structure gives the closed form its code implies (issue 15)."""
from __future__ import annotations

import re

import pytest
import yaml

from moesim import simulate
from moesim.hardware.runtime import RUNTIME_DIR, list_runtimes, load_runtime
from tests.helpers import scenario
from tests.test_runtime_costs import A, C, L, T_PCIE, _src, _two_fresh_per_layer

PRESETS = sorted(RUNTIME_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_field_written_in_a_preset_cites_a_file_at_a_commit(path):
    """A structural field is read from a stack's code: its source names a file and the commit."""
    raw = yaml.safe_load(path.read_text())
    fields = set(raw) - {"name", "description", "source"}
    assert fields and raw["name"] == path.stem
    assert fields <= set(raw["source"]), f"no source for {sorted(fields - set(raw['source']))}"
    for f in fields:
        src = raw["source"][f]
        assert re.search(r"commit [0-9a-f]{7,40}", src), f"{f}: no commit in its source"
        assert re.search(r"[\w/]+\.(py|cpp|h)\b", src), f"{f}: no file in its source"
    assert load_runtime(path.stem).name == path.stem


def test_moe_infinity_preset_has_the_structure_its_code_shows():
    assert "moe-infinity" in list_runtimes()
    rt = load_runtime("moe-infinity")
    # routing read back before enqueue; copies by the C++ fetch thread, kernels as each lands;
    # the Python thread waits for every expert; eviction drops the GPU copy
    assert (rt.blocking_readback, rt.blocking_loads, rt.synchronous_compute, rt.evict_writeback) == \
        (True, False, True, "none")
    assert all("cca059c" in rt.source[f] for f in
               ("blocking_readback", "blocking_loads", "synchronous_compute", "evict_writeback"))
    # host times are left to moesim calibrate, not typed in
    assert rt.layer_host_us == rt.step_host_us == rt.readback_us == rt.expert_dispatch_us == 0


def test_moe_infinity_layer_is_host_work_then_pipelined_loads_and_kernels(tmp_path):
    """Top-2, both experts miss, full cache, one copy engine, C < T: the host's layer work H, the
    attention A, then the two copies back to back with expert 1's kernel under expert 2's copy,
    then expert 2's kernel: a layer is H + A + 2T + C. No write-back: one copy per miss. With the
    host not waiting for the experts (async), H hides behind the previous layer's experts."""
    H = 0.5e-3
    assert C < T_PCIE
    trace, model = _two_fresh_per_layer(tmp_path)
    rt = {"preset": "moe-infinity", **_src(layer_host_us=H * 1e6)}
    res = simulate(scenario(trace, model=model, gpu={"capacity_experts": 2}, runtime=rt))
    s = res.summary
    assert s["misses"] == 4 * L * 2 and s["bytes_pcie"] == 4 * L * 2 * s["expert_bytes"]
    assert s["makespan_s"] == pytest.approx(4 * L * (H + A + 2 * T_PCIE + C), rel=1e-9)
    asyn = {**rt, "synchronous_compute": False}
    overlapped = simulate(scenario(trace, model=model, gpu={"capacity_experts": 2}, runtime=asyn))
    assert overlapped.summary["makespan_s"] < s["makespan_s"]
