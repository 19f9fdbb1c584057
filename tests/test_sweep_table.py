"""The sweep results table: speedup over the on_demand point sharing every other axis value."""
import pandas as pd
import pytest

from moesim.sweep.table import _cell, with_speedup


def test_speedup_is_relative_to_matching_on_demand_point():
    df = pd.DataFrame({
        "status": ["done"] * 4 + ["failed"],
        "cache.gpu.capacity_gb": [1, 1, 2, 2, 2],
        "predictor.name": ["on_demand", "oracle", "on_demand", "oracle", "topk"],
        "predictor_name": ["on_demand", "oracle", "on_demand", "oracle", "topk"],
        "tokens_per_s": [10.0, 15.0, 20.0, 22.0, None],
    })
    out = with_speedup(df, ["cache.gpu.capacity_gb", "predictor.name"])
    assert out["speedup"].tolist() == pytest.approx([1.0, 1.5, 1.0, 1.1])


def test_predictor_mapping_is_shown_compactly():
    assert _cell('{"name":"oracle","lookahead_layers":2}') == "oracle(lookahead_layers=2)"
    assert _cell({"name": "topk"}) == "topk"
    assert _cell(4) == "4"
