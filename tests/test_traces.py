"""Trace schema, Parquet I/O (streaming, validation), the synthetic generator and trace statistics."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.errors import InputError
from moesim.models import ModelSpec
from moesim.traces import (PRESET_SOURCES, PRESETS, SCHEMA_VERSION, RequestTrace, SyntheticParams, TraceMeta,
                           TraceReader, check_against_model, generate, generate_to_file, iter_generate,
                           read_requests, trace_info, write_trace)
from moesim.traces.synthetic import resolve_params

ROOT = Path(__file__).resolve().parents[1]
MODEL_PRESETS = ["switch-base-128", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b",
                 "olmoe-1b-7b", "phi-3.5-moe"]


def spec(L=4, E=16, K=2, name="tiny") -> ModelSpec:
    return ModelSpec(name=name, num_layers=L, num_experts=E, top_k=K, hidden_size=64, expert_intermediate_size=128,
                     num_heads=2, num_kv_heads=2, head_dim=32)


def meta(L=4, E=16, K=2, **kw) -> TraceMeta:
    return TraceMeta(model=kw.pop("model", "tiny"), num_layers=L, num_experts=E, top_k=K,
                     source=kw.pop("source", "test:hand-made"), seed=kw.pop("seed", 0), **kw)


def routing_table(routing: np.ndarray, prompt_lens, rids=None, extra=None) -> pa.Table:
    """routing [R, T, L, K] -> rows (request, token, layer) in order."""
    R, T, L, K = routing.shape
    rid, tok, lay = np.meshgrid(np.arange(R) if rids is None else np.asarray(rids), np.arange(T), np.arange(L),
                                indexing="ij")
    pl = np.asarray(prompt_lens)[:, None, None] * np.ones_like(tok)
    cols = {
        "request_id": pa.array(rid.ravel(), pa.int32()),
        "token": pa.array(tok.ravel(), pa.int32()),
        "phase": pa.array(np.where(tok.ravel() < pl.ravel(), "prefill", "decode")),
        "layer": pa.array(lay.ravel(), pa.int16()),
        "experts": pa.array(list(routing.reshape(-1, K).astype(np.int16)), pa.list_(pa.int16())),
    }
    cols.update(extra or {})
    return pa.table(cols)


def good_routing(R=3, T=5, L=4, K=2, E=16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(E)[:K] for _ in range(R * T * L)]).reshape(R, T, L, K).astype(np.int16)


def raw_write(path: Path, table: pa.Table, md: dict | None) -> Path:
    """Bypass write_trace (which sorts and checks): the file holds exactly these rows."""
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


# ---- round trip ---------------------------------------------------------------------------------

def test_round_trip_sorts_and_keeps_everything(tmp_path):
    routing = good_routing()
    R, T, L, K = routing.shape
    pre = np.random.default_rng(1).standard_normal((R * T * L, 6)).astype(np.float16)
    sc = np.random.default_rng(2).random((R * T * L, K)).astype(np.float32)
    t = routing_table(routing, [2, 3, 5], extra={"pre_attn": pa.array(list(pre), pa.list_(pa.float16())),
                                                 "scores": pa.array(list(sc), pa.list_(pa.float32()))})
    shuffled = t.take(np.random.default_rng(3).permutation(t.num_rows))
    path = write_trace(tmp_path / "t.parquet", shuffled, meta(seed=7))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    r = TraceReader(path)
    assert r.meta == meta(seed=7) and r.meta.schema_version == SCHEMA_VERSION
    assert r.num_rows == R * T * L and r.has_pre_attn and r.has_scores
    assert r.path == path
    schema = pq.read_schema(path)
    assert schema.field("phase").type == pa.dictionary(pa.int8(), pa.string())
    assert schema.field("experts").type == pa.list_(pa.int16())
    assert schema.field("pre_attn").type == pa.list_(pa.float16())
    reqs = list(r.iter_requests())
    assert [q.request_id for q in reqs] == [0, 1, 2]
    assert [(q.prompt_len, q.decode_len, q.layers) for q in reqs] == [(2, 3, L), (3, 2, L), (5, 0, L)]
    for i, q in enumerate(reqs):
        assert isinstance(q, RequestTrace) and q.tokens == T
        assert q.experts.dtype == np.int16 and q.experts.shape == (T, L, K)
        np.testing.assert_array_equal(q.experts, routing[i])
        np.testing.assert_array_equal(q.pre_attn, pre.reshape(R, T, L, 6)[i])
        np.testing.assert_array_equal(q.scores, sc.reshape(R, T, L, K)[i])
    # optional columns can be skipped
    q0 = next(r.iter_requests(pre_attn=False, scores=False))
    assert q0.pre_attn is None and q0.scores is None


def test_streaming_across_row_groups_equals_whole_read(tmp_path):
    s = spec(L=3, E=8, K=2)
    table = generate(s, dict(rho=0.5), requests=6, prompt_len=(1, 6), decode_len=(0, 9),
                     rng=np.random.default_rng(4), pre_attn=True, scores=True)
    whole = write_trace(tmp_path / "whole.parquet", table, meta(L=3, E=8, K=2))
    assert TraceReader(whole).num_row_groups == 1
    a = read_requests(whole)
    for rows in (1, 5, 7, 64):
        small = write_trace(tmp_path / f"small{rows}.parquet", table, meta(L=3, E=8, K=2), row_group_rows=rows)
        reader = TraceReader(small)
        assert reader.num_row_groups == -(-table.num_rows // rows)
        b = list(reader.iter_requests())
        assert len(a) == len(b) == 6
        for x, y in zip(a, b):
            assert (x.request_id, x.prompt_len, x.decode_len) == (y.request_id, y.prompt_len, y.decode_len)
            np.testing.assert_array_equal(x.experts, y.experts)
            np.testing.assert_array_equal(x.pre_attn, y.pre_attn)
            np.testing.assert_array_equal(x.scores, y.scores)



@pytest.mark.parametrize("batch_rows", [1, 5, 13])
def test_reading_in_small_batches_equals_whole_read(tmp_path, monkeypatch, batch_rows):
    """The reader decodes BATCH_ROWS rows at a time, whatever the file's row groups: requests cut across
    batches come out whole, and a bad row is still named by its row in the file."""
    import moesim.traces.io as tio
    s = spec(L=3, E=8, K=2)
    table = generate(s, dict(rho=0.5), requests=6, prompt_len=(1, 6), decode_len=(0, 9),
                     rng=np.random.default_rng(4), pre_attn=True, scores=True)
    whole = write_trace(tmp_path / "whole.parquet", table, meta(L=3, E=8, K=2))
    a = read_requests(whole)
    monkeypatch.setattr(tio, "BATCH_ROWS", batch_rows)
    b = list(TraceReader(whole).iter_requests())
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert (x.request_id, x.prompt_len, x.decode_len) == (y.request_id, y.prompt_len, y.decode_len)
        for f in ("experts", "pre_attn", "scores"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    edit, field, needles = BAD_ROWS["expert_too_big"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(edit(BASE).replace_schema_metadata(meta().to_metadata()), bad)
    with pytest.raises(InputError) as e:
        list(TraceReader(bad).iter_requests())
    assert e.value.field == field and all(n in str(e.value) for n in needles), str(e.value)

def test_streamed_pieces_make_the_same_file(tmp_path):
    s = spec()
    table = generate(s, None, requests=5, prompt_len=4, decode_len=6, rng=np.random.default_rng(0))
    one = write_trace(tmp_path / "one.parquet", table, meta(), row_group_rows=50)
    pieces = [table.slice(i, 37) for i in range(0, table.num_rows, 37)]
    many = write_trace(tmp_path / "many.parquet", iter(pieces), meta(), row_group_rows=50)
    assert one.read_bytes() == many.read_bytes()
    with pytest.raises(InputError, match="out of order"):
        write_trace(tmp_path / "bad.parquet", [pieces[1], pieces[0]], meta())


def test_failed_write_leaves_nothing(tmp_path):
    table = routing_table(good_routing(), [1, 1, 1])

    def pieces():
        yield table
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_trace(tmp_path / "t.parquet", pieces(), meta(), row_group_rows=4)
    assert list(tmp_path.iterdir()) == []


# ---- validation ---------------------------------------------------------------------------------

def _mutate_experts(t: pa.Table, row: int, value) -> pa.Table:
    ex = t.column("experts").to_pylist()
    ex[row] = value
    return t.set_column(t.column_names.index("experts"), "experts", pa.array(ex, pa.list_(pa.int16())))


def _drop(t: pa.Table, rows) -> pa.Table:
    keep = np.setdiff1d(np.arange(t.num_rows), rows)
    return t.take(keep)


def _set(t: pa.Table, name: str, row: int, value) -> pa.Table:
    v = t.column(name).to_pylist()
    v[row] = value
    return t.set_column(t.column_names.index(name), name, pa.array(v, t.schema.field(name).type))


def _set_many(t: pa.Table, name: str, rows, value) -> pa.Table:
    for r in rows:
        t = _set(t, name, r, value)
    return t


def _str_phase(t: pa.Table) -> pa.Table:
    return t.set_column(t.column_names.index("phase"), "phase", t.column("phase").cast(pa.string()))


BASE = routing_table(good_routing(), [2, 3, 5])   # 3 requests x 5 tokens x 4 layers, top-2 of 16
ROW = 45                                         # request 2, token 1, layer 1

BAD_ROWS = {
    "expert_too_big": (lambda t: _mutate_experts(t, ROW, [3, 16]), "experts", ["row 45", "16", "0..15"]),
    "expert_negative": (lambda t: _mutate_experts(t, ROW, [-1, 3]), "experts", ["row 45", "-1"]),
    "wrong_top_k": (lambda t: _mutate_experts(t, ROW, [1, 2, 3]), "experts", ["row 45", "expected 2", "found 3"]),
    "duplicate_expert": (lambda t: _mutate_experts(t, ROW, [5, 5]), "experts", ["row 45", "duplicate"]),
    "null_expert_list": (lambda t: _mutate_experts(t, ROW, None), "experts", ["row 45", "null"]),
    "layer_out_of_range": (lambda t: _set(t, "layer", ROW, 4), "layer", ["row 45", "layer out of range", "0..3"]),
    "missing_layer": (lambda t: _drop(t, [ROW]), "layer", ["row 45", "request 2 token 1", "missing layer 1"]),
    "missing_last_layer": (lambda t: _drop(t, [43]), "layer", ["request 2 token 0", "missing layer 3"]),
    "missing_token": (lambda t: _drop(t, range(44, 48)), "token", ["row 44", "request 2", "missing token 1"]),
    "unsorted": (lambda t: t.take(np.r_[0:10, 11, 10, 12:t.num_rows]), "layer", ["row 11", "not sorted"]),
    "duplicate_row": (lambda t: t.take(np.r_[0:11, 10, 11:t.num_rows]), "layer", ["row 11", "duplicate row"]),
    "request_split": (lambda t: t.take(np.r_[0:12, 20:40, 12:20, 40:t.num_rows]), "request_id",
                      ["row 32", "(request_id=0, token=3, layer=0) follows (request_id=1", "contiguous"]),
    "unknown_phase": (lambda t: _set(_str_phase(t), "phase", ROW, "warmup"), "phase", ["row 45", "warmup"]),
    "prefill_after_decode": (lambda t: _set_many(_str_phase(t), "phase", range(16, 20), "prefill"), "phase",
                             ["request 0", "prefill token after"]),
    "phase_differs_in_token": (lambda t: _set(_str_phase(t), "phase", ROW, "decode"), "phase",
                               ["request 2 token 1", "phase differs"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
@pytest.mark.parametrize("row_group_rows", [None, 7])
def test_bad_rows_name_file_field_row(tmp_path, case, row_group_rows):
    edit, field, needles = BAD_ROWS[case]
    bad = edit(BASE)
    path = tmp_path / f"{case}.parquet"
    pq.write_table(bad.replace_schema_metadata(meta().to_metadata()), path,
                   row_group_size=row_group_rows or bad.num_rows)
    with pytest.raises(InputError) as e:
        for _ in TraceReader(path).iter_requests():
            pass
    msg = str(e.value)
    assert msg.startswith(f"{path}: {field}: "), msg
    assert e.value.file == str(path) and e.value.field == field
    for n in needles:
        assert n in msg, (n, msg)
    assert "\n" not in msg


def test_writer_rejects_unknown_phase_and_bad_types(tmp_path):
    t = _set(BASE.set_column(2, "phase", BASE.column("phase").cast(pa.string())), "phase", 3, "warmup")
    with pytest.raises(InputError, match="row 3.*warmup"):
        write_trace(tmp_path / "x.parquet", t, meta())
    with pytest.raises(InputError, match="missing column"):
        write_trace(tmp_path / "x.parquet", BASE.drop_columns(["layer"]), meta())
    with pytest.raises(InputError, match="unknown column"):
        write_trace(tmp_path / "x.parquet", BASE.append_column("colour", pa.array(["red"] * BASE.num_rows)), meta())
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("edit,field,needle", [
    (lambda md: md.pop(b"moesim.num_experts"), "moesim.num_experts", "missing"),
    (lambda md: md.pop(b"moesim.schema_version"), "moesim.schema_version", "missing"),
    (lambda md: md.update({b"moesim.top_k": b"two"}), "moesim.top_k", "'two'"),
    (lambda md: md.update({b"moesim.num_layers": b"0"}), "moesim.num_layers", ">= 1"),
    (lambda md: md.update({b"moesim.top_k": b"17"}), "moesim.top_k", "exceeds"),
    (lambda md: md.update({b"moesim.schema_version": b"2"}), "moesim.schema_version", "found 2"),
    (lambda md: md.update({b"moesim.seed": b"x"}), "moesim.seed", "'x'"),
])
def test_bad_metadata(tmp_path, edit, field, needle):
    md = meta().to_metadata()
    edit(md)
    path = raw_write(tmp_path / "m.parquet", BASE, md)
    with pytest.raises(InputError) as e:
        TraceReader(path)
    assert str(e.value).startswith(f"{path}: {field}: ") and needle in str(e.value), str(e.value)


def test_no_metadata_and_missing_columns(tmp_path):
    with pytest.raises(InputError, match="moesim.schema_version: missing"):
        TraceReader(raw_write(tmp_path / "a.parquet", BASE, None))
    with pytest.raises(InputError, match="experts: missing column"):
        TraceReader(raw_write(tmp_path / "b.parquet", BASE.drop_columns(["experts"]), meta().to_metadata()))
    t = BASE.set_column(4, "experts", pa.array(["x"] * BASE.num_rows))
    with pytest.raises(InputError, match="experts: expected list<int16>, found string"):
        TraceReader(raw_write(tmp_path / "c.parquet", t, meta().to_metadata()))
    with pytest.raises(InputError, match="not found"):
        TraceReader(tmp_path / "nope.parquet")


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_file_is_input_error(tmp_path, cut):
    src = generate_to_file(tmp_path / "ok.parquet", spec(), requests=4, prompt_len=8, decode_len=8,
                           rng=np.random.default_rng(0), pre_attn=True, row_group_rows=100)
    data = src.read_bytes()
    bad = tmp_path / "trunc.parquet"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError) as e:
        list(TraceReader(bad).iter_requests())
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_bytes_are_input_error(tmp_path):
    src = generate_to_file(tmp_path / "ok.parquet", spec(), requests=4, prompt_len=8, decode_len=8,
                           rng=np.random.default_rng(0), row_group_rows=50)
    data = bytearray(src.read_bytes())
    for start in (4, len(data) // 3, len(data) // 2):
        bad = bytearray(data)
        bad[start:start + 64] = b"\xff" * 64
        path = tmp_path / f"corrupt{start}.parquet"
        path.write_bytes(bytes(bad))
        try:
            list(TraceReader(path).iter_requests())
        except InputError as e:
            assert str(path) in str(e)
        # (a flip that lands in padding or statistics may go unnoticed; it must never be a traceback)
    (tmp_path / "text.parquet").write_text("request_id,token\n1,2\n")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        TraceReader(tmp_path / "text.parquet")


def test_check_against_model():
    m = meta(L=4, E=16, K=2, model="tiny")
    check_against_model(m, spec(L=4, E=16, K=2), "t.parquet")
    for kw, field, exp, found in ((dict(L=5), "num_layers", 5, 4), (dict(E=32), "num_experts", 32, 16),
                                  (dict(K=1), "top_k", 1, 2)):
        with pytest.raises(InputError) as e:
            check_against_model(m, spec(**kw), "t.parquet")
        msg = str(e.value)
        assert msg.startswith(f"t.parquet: moesim.{field}: ")
        assert f"expected {field}={exp}" in msg and f"found {field}={found}" in msg


# ---- generator ----------------------------------------------------------------------------------

def test_same_seed_same_bytes_and_chunking_does_not_matter(tmp_path):
    s = spec(L=4, E=16, K=2)
    kw = dict(requests=5, prompt_len=(3, 9), decode_len=(0, 7), pre_attn=True, scores=True)
    a = generate_to_file(tmp_path / "a.parquet", s, rng=np.random.default_rng(11), seed=11, **kw)
    b = generate_to_file(tmp_path / "b.parquet", s, rng=np.random.default_rng(11), seed=11, **kw)
    c = generate_to_file(tmp_path / "c.parquet", s, rng=np.random.default_rng(12), seed=12, **kw)
    assert a.read_bytes() == b.read_bytes()
    assert pq.read_table(a).column("experts") != pq.read_table(c).column("experts")
    whole = pa.concat_tables(iter_generate(s, None, rng=np.random.default_rng(11), **kw))
    tiny = list(iter_generate(s, None, rng=np.random.default_rng(11), budget=1, **kw))
    assert len(tiny) == 5 and pa.concat_tables(tiny).equals(whole)
    assert whole.equals(generate(s, None, rng=np.random.default_rng(11), **kw))


def test_model_seed_shares_the_model_not_the_requests():
    """Same model_seed, different seed: one synthetic model (same popularity order), other requests."""
    s = spec(L=4, E=16, K=2)
    p = SyntheticParams(popularity_skew=2.0)

    def top(model_seed, seed):
        t = generate(s, p, requests=6, rng=np.random.default_rng(seed), model_rng=np.random.default_rng(model_seed))
        df = t.select(["layer", "experts"]).to_pandas().explode("experts")
        return df.groupby("layer")["experts"].agg(lambda x: x.value_counts().idxmax()).tolist(), t.column("experts")

    a, ea = top(5, 1)
    b, eb = top(5, 2)
    c, _ = top(6, 1)
    assert a == b and a != c and ea != eb


def test_generate_cli_records_the_model_seed(tmp_path):
    from click.testing import CliRunner

    from moesim.cli import main

    out = tmp_path / "m.parquet"
    res = CliRunner().invoke(main, ["trace", "generate", "--preset", "switch-base-128", "--requests", "1",
                                    "--decode-len", "2", "--seed", "3", "--model-seed", "7", "-o", str(out)])
    assert res.exit_code == 0, res.output
    meta = TraceReader(out).meta
    assert meta.seed == 3 and meta.source.startswith("synthetic:latent-gate(preset=switch-base-128,model_seed=7,")


def test_generated_rows_are_valid_and_shaped(tmp_path):
    s = spec(L=3, E=8, K=3)
    path = generate_to_file(tmp_path / "g.parquet", s, requests=6, prompt_len=(2, 5), decode_len=(1, 4),
                            rng=np.random.default_rng(0), seed=0, pre_attn=True, scores=True)
    r = TraceReader(path)
    assert r.meta.source.startswith("synthetic:latent-gate(preset=default,rho=")
    assert r.meta.seed == 0 and r.meta.model == "tiny"
    reqs = list(r.iter_requests())
    assert len(reqs) == 6
    assert all(2 <= q.prompt_len <= 5 and 1 <= q.decode_len <= 4 for q in reqs)
    assert len({(q.prompt_len, q.decode_len) for q in reqs}) > 1
    for q in reqs:
        assert q.pre_attn.shape == (q.tokens, 3, SyntheticParams().hidden_dim) and q.pre_attn.dtype == np.float16
        assert (np.diff(q.scores, axis=2) <= 0).all()              # gate-score order
        assert ((q.scores > 0) & (q.scores <= 1)).all()


def test_presets_cover_model_presets_and_name_their_sources():
    assert set(MODEL_PRESETS) <= set(PRESETS)
    assert set(PRESETS) == set(PRESET_SOURCES)
    assert resolve_params("olmoe-1b-7b")[1] == PRESETS["olmoe-1b-7b"]
    assert resolve_params("tiny") == ("default", SyntheticParams())
    assert resolve_params("tiny", {"rho": 0.1})[1].rho == 0.1
    with pytest.raises(InputError, match="unknown synthetic preset 'bogus'"):
        resolve_params("tiny", preset="bogus")
    with pytest.raises(InputError, match="synthetic.rho"):
        resolve_params("tiny", {"rho": 1.5})
    with pytest.raises(InputError, match="prompt_len"):
        generate(spec(), None, 2, (5, 3), 4, np.random.default_rng(0))


def _info(tmp_path, name, s, params, requests=24, prompt_len=32, decode_len=32, **kw):
    p = generate_to_file(tmp_path / f"{name}.parquet", s, params, requests=requests, prompt_len=prompt_len,
                         decode_len=decode_len, rng=np.random.default_rng(3), **kw)
    return trace_info(p)


def test_rho_raises_layer_to_layer_predictability(tmp_path):
    s = spec(L=8, E=16, K=2)
    lo = _info(tmp_path, "lo", s, dict(rho=0.1, gate_affinity=0.9, topic_weight=0.0))["transition"]
    hi = _info(tmp_path, "hi", s, dict(rho=0.97, gate_affinity=0.9, topic_weight=0.0))["transition"]
    assert hi["heldout_accuracy"] > lo["heldout_accuracy"] + 0.1
    assert hi["accuracy"] > lo["accuracy"] + 0.1
    assert hi["conditional_entropy_bits"] < lo["conditional_entropy_bits"] - 0.2
    assert hi["heldout_accuracy"] > 1.5 * hi["heldout_popularity_baseline"]


def test_skew_lowers_entropy_and_tau_raises_reuse(tmp_path):
    s = spec(L=4, E=32, K=2)
    flat = _info(tmp_path, "flat", s, dict(popularity_skew=0.0, tau=0.0, topic_weight=0.0))
    skew = _info(tmp_path, "skew", s, dict(popularity_skew=1.5, tau=0.0, topic_weight=0.0))
    local = _info(tmp_path, "local", s, dict(popularity_skew=0.0, tau=0.95, topic_weight=0.0))
    assert flat["popularity"]["entropy_normalised"] > 0.97
    assert skew["popularity"]["entropy_normalised"] < flat["popularity"]["entropy_normalised"] - 0.1
    assert local["temporal"]["top1_repeat"] > flat["temporal"]["top1_repeat"] + 0.3
    assert local["reuse_distance"]["p50"] <= flat["reuse_distance"]["p50"]
    assert local["reuse_distance"]["p90"] < flat["reuse_distance"]["p90"]


def test_attention_noise_hides_the_gate_from_pre_attn(tmp_path):
    """A linear read-out of pre_attn (fit on half the requests) predicts the top-1 expert well without
    attention noise and worse with it."""
    s = spec(L=2, E=8, K=1)

    def readout(noise):
        p = generate_to_file(tmp_path / f"n{noise}.parquet", s, dict(attention_noise=noise, popularity_skew=0.0),
                             requests=16, prompt_len=32, decode_len=32, rng=np.random.default_rng(5), pre_attn=True)
        reqs = read_requests(p)
        X = np.concatenate([q.pre_attn[:, 0].astype(np.float64) for q in reqs])
        y = np.concatenate([q.experts[:, 0, 0] for q in reqs])
        half = len(X) // 2
        Xb = np.c_[X, np.ones(len(X))]
        B = np.linalg.lstsq(Xb[:half], np.eye(8)[y[:half]], rcond=None)[0]
        return (np.argmax(Xb[half:] @ B, axis=1) == y[half:]).mean()

    clean, noisy = readout(0.0), readout(2.0)
    assert clean > 0.6 and clean > noisy + 0.2


def test_mixtral_preset_matches_its_published_repetition_rate(tmp_path):
    """Jiang et al. 2024 Table 5: consecutive tokens share the first-choice expert ~14-28% of the time."""
    s = spec(L=32, E=8, K=2, name="mixtral-8x7b")
    info = _info(tmp_path, "mix", s, None, requests=16, prompt_len=32, decode_len=64)
    assert 0.15 <= info["temporal"]["top1_repeat"] <= 0.26
    assert info["popularity"]["entropy_normalised"] > 0.95


# ---- samples and stats --------------------------------------------------------------------------

SAMPLES = {"olmoe-sample.parquet": ("olmoe-1b-7b", 16, 64, 8, True),
           "switch-sample.parquet": ("switch-base-128", 12, 128, 1, False)}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_trace_info_on_samples(name):
    model, L, E, K, pre = SAMPLES[name]
    path = ROOT / "traces" / name
    assert path.stat().st_size < 1_500_000
    r = TraceReader(path)
    assert (r.meta.model, r.meta.num_layers, r.meta.num_experts, r.meta.top_k) == (model, L, E, K)
    assert r.has_pre_attn == pre and r.meta.source.startswith(f"synthetic:latent-gate(preset={model},")
    info = trace_info(path)
    assert info["rows"] == 8 * 96 * L and info["requests"] == 8
    assert (info["prefill_tokens"], info["decode_tokens"], info["tokens"]) == (256, 512, 768)
    assert info["expert_accesses"] == 768 * L * K
    pop = info["popularity"]
    assert len(pop["entropy_bits_per_layer"]) == L
    assert 0 < pop["entropy_normalised"] <= 1 and pop["max_entropy_bits"] == pytest.approx(np.log2(E))
    rd = info["reuse_distance"]
    assert 1 <= rd["p50"] <= rd["p90"] <= rd["p99"] < 96
    assert rd["reaccesses"] + rd["first_touches"] == info["expert_accesses"]
    tr = info["transition"]
    assert tr["accuracy"] >= tr["popularity_baseline"]
    assert 0 <= tr["conditional_entropy_bits"] <= tr["next_layer_entropy_bits"]
    assert info["temporal"]["top1_repeat"] > info["temporal"]["top1_repeat_chance"]
    import json
    json.dumps(info)


def test_samples_regenerate_exactly(tmp_path):
    spec_ = importlib.util.spec_from_file_location("make_samples", ROOT / "traces" / "make_samples.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    for path in mod.main(tmp_path):
        shipped = ROOT / "traces" / path.name
        assert pq.read_table(path).equals(pq.read_table(shipped))
        assert pq.read_schema(path).metadata == pq.read_schema(shipped).metadata
        if pq.ParquetFile(path).metadata.created_by == pq.ParquetFile(shipped).metadata.created_by:
            assert path.read_bytes() == shipped.read_bytes()


def test_reading_is_fast(tmp_path):
    """~1M expert accesses read and validated well under a second (no per-row Python)."""
    import time

    s = spec(L=16, E=64, K=8)
    table = generate(s, None, requests=40, prompt_len=100, decode_len=100, rng=np.random.default_rng(0))
    path = write_trace(tmp_path / "big.parquet", table, meta(L=16, E=64, K=8), row_group_rows=20000)
    t0 = time.perf_counter()
    n = sum(q.experts.size for q in TraceReader(path).iter_requests())
    assert n == 40 * 200 * 16 * 8
    assert time.perf_counter() - t0 < 2.0
    os.remove(path)


def test_arrival_s_column_is_kept(tmp_path):
    """The optional per-request arrival time (batch.arrivals: trace) survives write_trace."""
    import pyarrow.parquet as pq

    from moesim.validate import write_routing
    from moesim.traces.io import write_trace
    from moesim.traces.schema import TraceMeta

    src = write_routing(tmp_path / "a.parquet", np.zeros((2, 2, 3, 1), np.int16), 1, 4)
    t = pq.read_table(src)
    t = t.append_column("arrival_s", pa.array(np.where(t.column("request_id").to_numpy() == 0, 0.0, 1.5)))
    out = write_trace(tmp_path / "b.parquet", t, TraceMeta(model="tiny", num_layers=3, num_experts=4, top_k=1,
                                                            source="test"))
    back = pq.read_table(out)
    assert back.schema.field("arrival_s").type == pa.float64()
    assert sorted(set(back.column("arrival_s").to_pylist())) == [0.0, 1.5]
