"""`moesim trace import`: CSV/JSONL, NumPy, moe-policylang, llama.cpp logs -> moesim traces."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from moesim.errors import InputError
from moesim.traces import TraceReader, read_requests
from moesim.cli.trace_sources import _standalone
from moesim.routing.importers import Shape, import_trace, resolve_shape

SHAPE = Shape(num_layers=3, num_experts=8, top_k=2)


def routing(R=2, T=5, L=3, K=2, E=8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(E)[:K] for _ in range(R * T * L)]).reshape(R, T, L, K)


def csv_text(ex: np.ndarray, prompt_len=3, style="space", phase=True, scores=False, shuffle=False) -> str:
    R, T, L, K = ex.shape
    rows = []
    for r in range(R):
        for t in range(T):
            for l in range(L):
                e = ex[r, t, l]
                cell = {"space": " ".join(map(str, e)), "comma": '"' + ",".join(map(str, e)) + '"',
                        "json": '"' + json.dumps(e.tolist()) + '"'}[style]
                row = [str(r), str(t), str(l), cell]
                if phase:
                    row.append("prefill" if t < prompt_len else "decode")
                if scores:
                    row.append("0.6 0.4")
                rows.append(",".join(row))
    if shuffle:
        rows = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    head = "request_id,token,layer,experts" + (",phase" if phase else "") + (",scores" if scores else "")
    return head + "\n" + "\n".join(rows) + "\n"


def check(path, ex: np.ndarray, prompt_len):
    reqs = read_requests(path)
    assert len(reqs) == ex.shape[0]
    for r, want in zip(reqs, ex):
        assert (r.experts == want).all()
        assert r.prompt_len == (prompt_len if prompt_len != "all" else want.shape[0])


# ---- CSV / JSONL -------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["space", "comma", "json"])
def test_csv_round_trip(tmp_path, style):
    ex = routing()
    src = tmp_path / "r.csv"
    src.write_text(csv_text(ex, style=style, shuffle=True, scores=True))
    out, meta = import_trace(src, "csv", tmp_path / "o.parquet", SHAPE, model_name="m")
    check(out, ex, 3)
    assert meta.source == "collected:m@r.csv (imported from csv)"
    rd = read_requests(out)
    assert rd[0].scores.shape == (5, 3, 2) and np.allclose(rd[0].scores, [0.6, 0.4])


def test_csv_without_phase_needs_prompt_len(tmp_path):
    ex = routing()
    src = tmp_path / "r.csv"
    src.write_text(csv_text(ex, phase=False))
    with pytest.raises(InputError, match="--prompt-len"):
        import_trace(src, "csv", tmp_path / "o.parquet", SHAPE)
    out, _ = import_trace(src, "csv", tmp_path / "o.parquet", SHAPE, prompt_len=2)
    check(out, ex, 2)
    out, _ = import_trace(src, "csv", tmp_path / "o2.parquet", SHAPE, prompt_len="all")
    check(out, ex, "all")


def test_jsonl_round_trip_with_string_request_ids(tmp_path):
    ex = routing()
    lines = [json.dumps({"request_id": f"p{r}", "token": t, "layer": l, "experts": ex[r, t, l].tolist(),
                         "phase": "prefill" if t < 2 else "decode"})
             for r in range(2) for t in range(5) for l in range(3)]
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out, _ = import_trace(src, "jsonl", tmp_path / "o.parquet", SHAPE)
    check(out, ex, 2)


BAD_CSV = [
    # (description, edit (line index 1-based of data row -> new row), expected message parts)
    ("expert id too large", {2: "0,0,1,3 8,prefill"}, ["line 3", "expert id out of range", "found 8"]),
    ("negative expert id", {2: "0,0,1,-1 3,prefill"}, ["line 3", "out of range"]),
    ("too few experts", {4: "0,1,0,3,prefill"}, ["line 5", "expected 2 experts (top_k), found 1"]),
    ("duplicate expert", {4: "0,1,0,3 3,prefill"}, ["line 5", "duplicate expert"]),
    ("layer out of range", {3: "0,0,3,1 2,prefill"}, ["line 4", "layer 3 out of range"]),
    ("not an integer", {3: "0,zero,2,1 2,prefill"}, ["line 4", "token", "expected an integer"]),
    ("bad experts text", {3: "0,0,2,a b,prefill"}, ["line 4", "experts"]),
    ("bad phase", {3: "0,0,2,1 2,prefil"}, ["line 4", "phase"]),
    ("duplicate row", {3: "0,0,1,1 2,prefill"}, ["line 4", "duplicate row", "line 3"]),
]


@pytest.mark.parametrize("what,edit,parts", BAD_CSV, ids=[b[0] for b in BAD_CSV])
def test_csv_errors_name_the_line(tmp_path, what, edit, parts):
    lines = csv_text(routing(), prompt_len=3).splitlines()
    for i, row in edit.items():
        lines[i] = row
    src = tmp_path / "bad.csv"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        import_trace(src, "csv", tmp_path / "o.parquet", SHAPE)
    msg = str(e.value)
    assert str(src) in msg
    for p in parts:
        assert p in msg, msg
    assert not (tmp_path / "o.parquet").exists()


def test_structure_errors(tmp_path):
    lines = csv_text(routing(R=1), prompt_len=3).splitlines()
    src = tmp_path / "bad.csv"
    src.write_text("\n".join(lines[:1] + lines[1:3] + lines[4:]) + "\n")      # token 0 layer 2 missing
    with pytest.raises(InputError, match="request 0 token 0: missing layer 2"):
        import_trace(src, "csv", tmp_path / "o.parquet", SHAPE)
    src.write_text("\n".join(lines[:1] + lines[4:]) + "\n")                   # token 0 missing
    with pytest.raises(InputError, match="request 0: missing token 0"):
        import_trace(src, "csv", tmp_path / "o.parquet", SHAPE)
    src.write_text("\n".join(lines[:-1]) + "\n")                              # last token's last layer missing
    with pytest.raises(InputError, match="token 4: missing layer 2"):
        import_trace(src, "csv", tmp_path / "o.parquet", SHAPE)
    text = csv_text(routing(R=1), prompt_len=3).replace("0,3,0,", "X").replace("X", "0,3,0,")
    rows = text.splitlines()
    rows[1 + 3 * 3] = rows[1 + 3 * 3].replace("decode", "prefill")           # token 3 layer 0 prefill
    src.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match="phase differs between layers"):
        import_trace(src, "csv", tmp_path / "o.parquet", SHAPE)


# ---- NumPy ----------------------------------------------------------------------------------------------

def test_numpy_npy_and_npz(tmp_path):
    ex = routing()
    np.save(tmp_path / "one.npy", ex[0])
    out, _ = import_trace(tmp_path / "one.npy", "numpy", tmp_path / "a.parquet", SHAPE, prompt_len=2)
    check(out, ex[:1], 2)
    np.save(tmp_path / "stack.npy", ex.astype(np.int16))
    out, _ = import_trace(tmp_path / "stack.npy", "numpy", tmp_path / "b.parquet", SHAPE, prompt_len=2)
    check(out, ex, 2)
    # a list of requests of different lengths (.npz), and -1 padding at the end of a stack
    np.savez(tmp_path / "list.npz", ex[0], ex[1, :3])
    out, _ = import_trace(tmp_path / "list.npz", "numpy", tmp_path / "c.parquet", SHAPE, prompt_len=2)
    reqs = read_requests(out)
    assert [r.tokens for r in reqs] == [5, 3] and (reqs[1].experts == ex[1, :3]).all()
    padded = ex.copy()
    padded[1, 3:] = -1
    np.save(tmp_path / "pad.npy", padded)
    out, _ = import_trace(tmp_path / "pad.npy", "numpy", tmp_path / "d.parquet", SHAPE, prompt_len=2)
    assert [r.tokens for r in read_requests(out)] == [5, 3]


def test_numpy_errors_name_the_index(tmp_path):
    ex = routing()
    bad = ex.copy()
    bad[1, 2, 1, 0] = 9
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(InputError, match=r"bad\.npy\[1\]\[token 2, layer 1\]: expert id out of range.*found 9"):
        import_trace(tmp_path / "bad.npy", "numpy", tmp_path / "o.parquet", SHAPE, prompt_len=2)
    np.save(tmp_path / "k.npy", ex[..., :1])
    with pytest.raises(InputError, match="expected top_k=2"):
        import_trace(tmp_path / "k.npy", "numpy", tmp_path / "o.parquet", SHAPE, prompt_len=2)
    np.save(tmp_path / "l.npy", ex[0, :, :2])
    with pytest.raises(InputError, match="missing layer 2"):
        import_trace(tmp_path / "l.npy", "numpy", tmp_path / "o.parquet", SHAPE, prompt_len=2)
    np.save(tmp_path / "f.npy", ex[0] + 0.5)
    with pytest.raises(InputError, match="integer array"):
        import_trace(tmp_path / "f.npy", "numpy", tmp_path / "o.parquet", SHAPE, prompt_len=2)
    with pytest.raises(InputError, match="--prompt-len"):
        import_trace(tmp_path / "k.npy", "numpy", tmp_path / "o.parquet", SHAPE)


# ---- moe-policylang -----------------------------------------------------------------------------------------

def policylang_table(ex: np.ndarray) -> pa.Table:
    R, T, L, K = ex.shape
    r, t, l = np.meshgrid(np.arange(R), np.arange(T), np.arange(L), indexing="ij")
    return pa.table({
        "prompt_id": pa.array(r.ravel()),
        "token_idx": pa.array(t.ravel()),
        "layer_idx": pa.array(l.ravel()),
        "selected_experts": pa.array(ex.reshape(-1, K).tolist(), pa.list_(pa.int64())),
        "router_scores": pa.array([[0.7, 0.3]] * (R * T * L), pa.list_(pa.float64())),
    })


def test_policylang_parquet_and_jsonl(tmp_path):
    ex = routing()
    tbl = policylang_table(ex)
    pq.write_table(tbl, tmp_path / "p.parquet")
    out, _ = import_trace(tmp_path / "p.parquet", "policylang", tmp_path / "o.parquet", SHAPE, prompt_len=4)
    check(out, ex, 4)
    assert np.allclose(read_requests(out)[0].scores, [0.7, 0.3])
    with open(tmp_path / "p.jsonl", "w") as f:
        for row in tbl.to_pylist():
            f.write(json.dumps(row) + "\n")
    out, _ = import_trace(tmp_path / "p.jsonl", "policylang", tmp_path / "o2.parquet", SHAPE, prompt_len="all")
    check(out, ex, "all")
    # a bad id names the Parquet row (0-based)
    rows = tbl.to_pylist()
    rows[7]["selected_experts"] = [1, 99]
    pq.write_table(pa.Table.from_pylist(rows, schema=tbl.schema), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"row 7: expert id out of range.*found 99"):
        import_trace(tmp_path / "bad.parquet", "policylang", tmp_path / "o3.parquet", SHAPE, prompt_len=4)
    pq.write_table(tbl.drop(["layer_idx"]), tmp_path / "nolayer.parquet")
    with pytest.raises(InputError, match="layer_idx"):
        import_trace(tmp_path / "nolayer.parquet", "policylang", tmp_path / "o3.parquet", SHAPE, prompt_len=4)


# ---- llama.cpp ------------------------------------------------------------------------------------------------

def llamacpp_log(ex: np.ndarray, prompt_len: int, style="kv", first_block=1) -> str:
    """Per request: one prefill batch (all prompt tokens), then one batch per decoded token; per batch
    one line per layer with the n x top_k ids, token by token."""
    out = ["llama_model_loader: loaded meta data", "system_info: n_threads = 8"]
    R, T, L, K = ex.shape
    for r in range(R):
        batches = [range(prompt_len)] + [range(t, t + 1) for t in range(prompt_len, T)]
        for b in batches:
            for l in range(L):
                ids = [int(e) for t in b for e in ex[r, t, l]]
                if style == "kv":
                    out.append(f"moe: layer_id={l + first_block} expert_ids={','.join(map(str, ids))}")
                elif style == "json":
                    out.append(f"[trace] layer_id: {l + first_block}, expert_ids: {ids}")
                else:  # one CSV row per routed activation
                    out.extend(f"{l + first_block},{e}" for e in ids)
    if style == "csv":
        out.insert(0, "layer,expert")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("style", ["kv", "json", "csv"])
def test_llamacpp_log(tmp_path, style):
    ex = routing(R=2, T=6)
    src = tmp_path / "log.txt"
    src.write_text(llamacpp_log(ex, 3, style))
    out, _ = import_trace(src, "llamacpp", tmp_path / "o.parquet", SHAPE)
    check(out, ex, 3)   # two requests: the second prompt batch follows decode steps


def test_llamacpp_request_marker_and_errors(tmp_path):
    ex = routing(R=1, T=4)
    src = tmp_path / "log.txt"
    text = llamacpp_log(ex, 2)
    src.write_text(text + "request 1\n" + llamacpp_log(ex, 1))   # second request with a 1-token prompt
    reqs = read_requests(import_trace(src, "llamacpp", tmp_path / "o.parquet", SHAPE)[0])
    assert [(r.prompt_len, r.tokens) for r in reqs] == [(2, 4), (1, 4)]
    lines = text.splitlines()
    k = next(i for i, s in enumerate(lines) if "layer_id=2 " in s)
    src.write_text("\n".join(lines[:k] + lines[k + 1:]) + "\n")                  # a layer missing from a batch
    with pytest.raises(InputError, match=r"line \d+: expected layer 2 after layer 1"):
        import_trace(src, "llamacpp", tmp_path / "o.parquet", SHAPE)
    bad = lines.copy()
    bad[k] = bad[k].split("expert_ids=")[0] + "expert_ids=1,2,3"                 # 3 ids for top-2
    src.write_text("\n".join(bad) + "\n")
    with pytest.raises(InputError, match=rf"line {k + 1}: layer 2 has 3 expert ids"):
        import_trace(src, "llamacpp", tmp_path / "o.parquet", SHAPE)
    bad = lines.copy()
    bad[k] = bad[k].split("expert_ids=")[0] + "expert_ids=" + ",".join(["9"] + ["1"] * 3)
    src.write_text("\n".join(bad) + "\n")
    with pytest.raises(InputError, match=rf"line {k + 1} \(token 0 of the batch\): expert id out of range"):
        import_trace(src, "llamacpp", tmp_path / "o.parquet", SHAPE)
    bad = lines.copy()
    bad[k] = "layer_id=2 expert_ids="
    src.write_text("\n".join(bad) + "\n")
    with pytest.raises(InputError, match=rf"line {k + 1}: cannot read"):
        import_trace(src, "llamacpp", tmp_path / "o.parquet", SHAPE)


# ---- shape and CLI ----------------------------------------------------------------------------------------------

def test_shape_from_preset_or_flags():
    s, name = resolve_shape("mixtral-8x7b", None, None, None)
    assert (s.num_layers, s.num_experts, s.top_k, name) == (32, 8, 2, "mixtral-8x7b")
    s, _ = resolve_shape("mixtral-8x7b", 4, None, None)
    assert s.num_layers == 4
    with pytest.raises(InputError, match="--num-experts"):
        resolve_shape(None, 4, None, 2)
    with pytest.raises(InputError, match="unknown model preset"):
        resolve_shape("nope", None, None, None)
    with pytest.raises(InputError, match="top_k"):
        resolve_shape(None, 2, 4, 8)


def test_cli_import(tmp_path):
    ex = routing()
    src = tmp_path / "r.csv"
    src.write_text(csv_text(ex))
    out = tmp_path / "o.parquet"
    res = CliRunner().invoke(_standalone, ["import", str(src), "--format", "csv", "--num-layers", "3",
                                           "--num-experts", "8", "--top-k", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert TraceReader(out).meta.model == "r"
    res = CliRunner().invoke(_standalone, ["import", str(src), "--format", "csv", "--model", "mixtral-8x7b",
                                           "-o", str(out)])
    assert res.exit_code == 2 and "layer" in res.output and "line" in res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
