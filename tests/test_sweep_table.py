"""The sweep results table: speedup over the on_demand point sharing every other axis value."""
import pandas as pd
import pytest

from moesim.sweep.table import _cell, table_rows, with_speedup


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


def test_table_rows_are_data_with_formatted_cells():
    df = pd.DataFrame({
        "status": ["done", "done", "failed"],
        "cache.gpu.policy": ["lru", "fifo", "lru"],
        "predictor_name": ["on_demand", "on_demand", "on_demand"],
        "tokens_per_s": [10.0, 12.5, None],
        "bytes_pcie": [2.5e9, 1e9, None],
        "misses": [1234, 1000, None],
    })
    axes, numbers, rows = table_rows(df, ["cache.gpu.policy"])
    assert axes == ["cache.gpu.policy", "predictor_name"]
    assert numbers[:2] == ["tokens/s", "vs on_demand"] and "misses" in numbers  # the policy varies
    assert rows[0][:4] == ["lru", "on_demand", "10.0", "1.00×"]
    assert rows[1][numbers.index("PCIe GB") + 2] == "1.00"
    assert rows[0][numbers.index("misses") + 2] == "1,234"
    assert rows[0][numbers.index("precision") + 2] == "-"  # not in the results
    assert table_rows(df[df["status"] == "failed"], ["cache.gpu.policy"]) == ([], [], [])
