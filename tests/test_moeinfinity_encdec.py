"""The decoder-side presets of Switch-large-128 and NLLB-MoE-54B and the MoE-Infinity A5000
four-point file that fits both host terms on them (benchmarks/published, issue 15)."""
from __future__ import annotations

from pathlib import Path

import pytest

from moesim.config import load_scenario
from moesim.models import get_preset

PUB = Path(__file__).resolve().parents[1] / "benchmarks" / "published"
FOUR = PUB / "moeinfinity-a5000-4pt.points.yaml"


@pytest.mark.parametrize("name, moe, dense, top_k, expert_bytes", [
    # flaxformer switch_large.gin: 24 decoder blocks, every other one MoE; relu MLP 1024 x 4096
    ("switch-large-128", 12, 12, 1, 2 * 1024 * 4096 * 2),
    # nllb-moe-54b config.json: 24 decoder blocks, (i + 1) % 4 == 0 sparse; relu FFN 2048 x 8192
    ("nllb-moe-54b", 6, 18, 2, 2 * 2048 * 8192 * 2),
])
def test_decoder_presets_match_their_configs(name, moe, dense, top_k, expert_bytes):
    m = get_preset(name)
    assert (m.num_layers, m.first_dense_layers, m.top_k, m.num_experts, m.gated) == (moe, dense, top_k, 128, False)
    assert m.dense_intermediate_size == m.expert_intermediate_size
    assert m.expert_bytes == expert_bytes
    assert m.num_heads * m.head_dim == m.hidden_size


@pytest.mark.parametrize("scenario, expert_bytes, capacity_gb", [
    ("moeinfinity-a5000-switch-large.yaml", 2 * 1024 * 4096 * 4, 19),   # fp32 checkpoint
    ("moeinfinity-a5000-nllb.yaml", 2 * 2048 * 8192 * 4, 9.4),
])
def test_encdec_scenarios_run_fp32_decoders_on_the_a5000(scenario, expert_bytes, capacity_gb):
    sc = load_scenario(PUB / "scenarios" / scenario)
    assert sc.hardware.name == "rtx-a5000-pcie4" and sc.batch.size == 1
    assert sc.model.expert_bytes == expert_bytes
    assert sc.cache.gpu.capacity_gb == capacity_gb
    # the decoder starts from one token; the prompt goes through the (unsimulated) encoder
    assert sc.trace.synthetic.prompt_len == 1 and sc.trace.synthetic.decode_len == 128


def test_four_point_file_fits_both_host_terms_and_holds_out_deepseek():
    from moesim.calibrate import load_points

    spec, points = load_points(FOUR)
    assert str(spec.base_runtime) == "moe-infinity"
    assert set(spec.free) == {"layer_host_us", "expert_dispatch_us"}
    fitted = {p.spec.name for p in points if not p.spec.holdout}
    held = {p.spec.name for p in points if p.spec.holdout}
    assert fitted == {"a5000-moeinfinity-mixtral", "a5000-moeinfinity-switch-large-128",
                      "a5000-moeinfinity-nllb-moe-54b"}
    assert held == {"a5000-moeinfinity-deepseek-v2-lite"}
    published = {p.spec.name: p.spec.tpot_ms for p in points}
    assert published["a5000-moeinfinity-switch-large-128"] == 130 and published["a5000-moeinfinity-nllb-moe-54b"] == 119


def test_fitted_four_point_runtime_names_its_points():
    from moesim.hardware.runtime import load_runtime

    rt = load_runtime(str(PUB / "fitted" / "moeinfinity-a5000-4pt.runtime.yaml"))
    assert rt.layer_host_us > 0 and rt.expert_dispatch_us > 0
    assert not rt.blocking_loads and rt.blocking_readback and rt.synchronous_compute
    for field in ("layer_host_us", "expert_dispatch_us"):
        assert "moeinfinity-a5000-4pt.points.yaml" in rt.source[field]
        assert "Switch-large-128" in rt.source[field] and "NLLB-MoE-54B" in rt.source[field]
