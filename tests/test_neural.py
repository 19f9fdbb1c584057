"""The learned predictors (speculation, pre_attention): models, samples, training, checkpoints,
evaluation, CLI and the simulator. Tiny models on tiny synthetic traces, CPU, one torch thread."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

import moesim
from moesim.errors import InputError
from moesim.models import ModelSpec
from moesim.predictors import registry
from moesim.cli.render import format_evaluation
from moesim.predictors.neural import evaluate, train
from moesim.cli.predictor import predictor as predictor_cli
from moesim.predictors.neural.config import build_configs
from moesim.predictors.neural.data import load_trace, speculation_samples
from moesim.predictors.neural.models import PreAttentionNet, SpeculationModel
from moesim.predictors.neural.training import load_model, spec_predict, spec_tensors
from moesim.traces.synthetic import generate_to_file
from moesim.validate import TINY_MODEL

from .helpers import scenario, write_routing


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add overhead (and contention noise)
    yield
    torch.set_num_threads(n)


def spec(L, E, K, name="tiny-nn"):
    return ModelSpec(name=name, num_layers=L, num_experts=E, top_k=K, hidden_size=64, expert_intermediate_size=64,
                     num_heads=4, num_kv_heads=4, head_dim=16)


def gen(path, model, requests, prompt=8, decode=24, seed=0, **params):
    p = dict(rho=0.5, tau=0.2, attention_noise=0.0, popularity_skew=0.2, hidden_dim=8, topic_weight=0.0,
             gate_affinity=0.0)
    p.update(params)
    return generate_to_file(path, model, p, requests=requests, prompt_len=prompt, decode_len=decode,
                            rng=np.random.default_rng(seed), seed=seed, pre_attn=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("neural")


@pytest.fixture(scope="module")
def tiny_trace(work):
    """The engine's TINY_MODEL (4 layers x 16 experts, top-1), with pre_attn."""
    return gen(work / "tiny.parquet", ModelSpec(**TINY_MODEL), 12, prompt=6, decode=10, rho=0.9, gate_affinity=0.9)


@pytest.fixture(scope="module")
def tiny_ckpts(work, tiny_trace):
    s = train("speculation", tiny_trace, preset="tiny", train_overrides={"epochs": 2}, output=work / "s.pt",
              progress=False)
    p = train("pre_attention", tiny_trace, preset="tiny", train_overrides={"epochs": 20, "lr": 0.01}, output=work / "p.pt",
              progress=False)
    return work / "s.pt", work / "p.pt", s, p


# ---- without torch ---------------------------------------------------------------------------------

def test_moesim_imports_and_runs_without_torch(tiny_trace):
    code = f"""
import sys
sys.modules['torch'] = None          # any 'import torch' now fails
import moesim, moesim.cli
from moesim.predictors import registry
from moesim.cli.predictor import predictor
assert {{'speculation', 'pre_attention'}} <= set(registry.names())
registry.validate('speculation', {{'checkpoint': 'x.pt'}})
from moesim.validate import tiny_scenario
r = moesim.simulate(tiny_scenario({str(tiny_trace)!r}, predictor={{'name': 'topk'}}))
assert r.summary['tokens_per_s'] > 0
from moesim.errors import InputError
from moesim.models import ModelSpec
from moesim.validate import TINY_MODEL
try:
    registry.create('speculation', {{'checkpoint': 'x.pt'}}, ModelSpec(**TINY_MODEL), None)
except InputError as e:
    assert 'PyTorch' in str(e), e
else:
    raise AssertionError('no error')
assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# ---- models ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prev_tokens,per_layer", [(0, True), (2, True), (0, False)])
def test_speculation_model_shapes(prev_tokens, per_layer):
    mc, _ = build_configs("speculation", {"num_layers": 6, "num_experts": 16, "top_k": 2}, "tiny",
                          {"prev_tokens": prev_tokens, "per_layer_experts": per_layer, "per_layer_head": per_layer})
    m = SpeculationModel(mc).eval()
    B, C = 5, mc.context_length + prev_tokens * (mc.context_length + mc.horizon)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, C, dtype=torch.bool)
    mask[0, :-1] = False                         # only the newest slot
    logits, conf = m(torch.randint(0, 16, (B, C, 2), generator=g), torch.randint(0, 6, (B, C), generator=g),
                     torch.randint(0, 100, (B, C), generator=g), mask, torch.randint(0, 6, (B, mc.horizon), generator=g))
    assert logits.shape == (B, mc.horizon, 16) and conf.shape == (B, mc.horizon)
    assert torch.isfinite(logits).all() and ((conf >= 0) & (conf <= 1)).all()


@pytest.mark.parametrize("arch", [1, 2])
def test_pre_attention_model_shapes(arch):
    mc, _ = build_configs("pre_attention", {"num_layers": 3, "num_experts": 16, "top_k": 2, "input_dim": 8},
                          "tiny", {"arch": arch})
    m = PreAttentionNet(mc).eval()
    assert len(m.layers) == 3
    assert m(torch.randn(7, 8), 2).shape == (7, 16)
    assert (arch == 1) == any(isinstance(x, torch.nn.BatchNorm1d) for x in m.modules())


def test_presets_have_the_seed_sizes():
    from moesim.predictors.neural import parameter_counts

    rows = {(r["kind"], r["preset"]): r for r in parameter_counts({"num_layers": 12, "num_experts": 128,
                                                                   "top_k": 1, "input_dim": 512})}
    b, x = rows["speculation", "baseline"], rows["speculation", "extended"]
    assert (b["model"]["model_dim"], b["model"]["num_heads"], b["model"]["num_attention_layers"]) == (256, 8, 4)
    assert (x["model"]["model_dim"], x["model"]["num_heads"], x["model"]["num_attention_layers"]) == (320, 10, 5)
    assert 0 < rows["speculation", "tiny"]["parameters"] < b["parameters"] < x["parameters"]
    assert rows["pre_attention", "arch1"]["model"]["hidden"] == 2048


# ---- samples: only routing known at the gate ------------------------------------------------------

def test_speculation_context_rule(work):
    L, E = 4, 8
    routing = np.arange(2 * 5 * L).reshape(2, 5, L, 1) % E          # 2 requests, 5 tokens (3 prompt)
    path = write_routing(work / "rule.parquet", routing.astype(np.int16), prompt_len=3, num_experts=E)
    s = speculation_samples(load_trace(path).requests, L, context_length=3, horizon=2)
    idx = {(int(r), int(t), int(a)): i for i, (r, t, a) in enumerate(zip(s.req, s.tok, s.anchor))}
    # prefill token 1, layer 0: its own layer 0 only (the previous token's layers 2-3 are not routed yet)
    assert s.ctx_mask[idx[0, 1, 0]].tolist() == [False, False, True]
    # decode token 3, layer 0: the previous token's layers 2 and 3 as well
    i = idx[0, 3, 0]
    assert s.ctx_mask[i].tolist() == [True, True, True]
    assert s.ctx_t[i].tolist() == [2, 2, 3] and s.ctx_l[i].tolist() == [2, 3, 0]
    # targets past the last layer: only from the last prompt token on
    assert (0, 1, 3) not in idx            # no target left: not a sample
    assert s.tgt_mask[idx[0, 2, 3]].tolist() == [True, True]
    assert s.tgt_l[idx[0, 2, 3]].tolist() == [0, 1]


class FakeView:
    def __init__(self, plan):
        self.step, self.phase, self.request_ids = plan.index, plan.phase, plan.request_ids
        self.token_request_ids = plan.token_requests
        self._r = plan.routing

    def token_experts(self, layer):
        return self._r[:, layer, :]


def test_simulator_context_equals_training_context(work):
    """The engine predictor builds, at every gate, exactly the context the training samples hold."""
    from moesim.engine.plan import static_plan
    from moesim.traces import TraceReader

    m = spec(4, 16, 2)
    path = gen(work / "ctx.parquet", m, 5, prompt=5, decode=6)
    ck = work / "ctx.pt"
    train("speculation", path, preset="tiny", model_overrides={"prev_tokens": 2}, train_overrides={"epochs": 1},
          output=ck, progress=False)
    pred = registry.create("speculation", {"checkpoint": str(ck), "latency_us": 0}, m, np.random.default_rng(0))
    data = load_trace(path)
    s = speculation_samples(data.requests, 4, 3, 2, True, 2)
    rid_of = {i: r.request_id for i, r in enumerate(data.requests)}
    idx = {(rid_of[int(r)], int(t), int(a)): i for i, (r, t, a) in enumerate(zip(s.req, s.tok, s.anchor))}
    checked = 0
    for plan in static_plan(TraceReader(path).iter_requests(), 2, 16):
        view = FakeView(plan)
        for a in range(4):
            pred._begin(view)
            pred.route[:, a] = view.token_experts(a)
            e, lay, t, ok = pred._context(a)
            for row in range(len(pred.rids)):
                i = idx.get((int(pred.rids[row]), int(pred.pos[row]), a))
                if i is None:   # the request's very last positions have no target: not a sample
                    continue
                assert ok[row].tolist() == s.ctx_mask[i].tolist()
                mk = s.ctx_mask[i]
                assert (e[row][mk] == s.ctx_e[i][mk]).all() and (lay[row][mk] == s.ctx_l[i][mk]).all()
                assert (t[row][mk] == s.ctx_t[i][mk]).all()
                checked += 1
        pred.on_step_end(view)
    assert checked > 150


# ---- training -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def structured(work):
    """Top-1, 6 layers x 16 experts; the hidden state persists across layers (rho 0.98) in 4
    dimensions, routers half-related: several context layers pin the state down better than one."""
    path = gen(work / "struct.parquet", spec(6, 16, 1), 40, rho=0.98, hidden_dim=4, gate_affinity=0.5)
    ck = train("speculation", path, preset="tiny", train_overrides={"epochs": 15}, output=work / "struct.pt",
               progress=False)
    return path, work / "struct.pt", ck


def test_training_reduces_loss(structured):
    h = [e for e in structured[2]["history"] if not e.get("partial")]
    assert h[-1]["train_loss"] < 0.85 * h[0]["train_loss"]
    assert structured[2]["val_score"] > h[0]["val_score"]


def test_beats_frequency_and_markov_on_held_out_requests(structured):
    r = evaluate(structured[1], measure=False)
    assert r["split"] == "test" and set(r["requests"]).isdisjoint(json.loads(json.dumps(
        torch.load(structured[1], weights_only=True)["split"]["train"])))
    t1 = {row["name"].split(" ")[0]: row for row in r["tables"][0]["rows"]}
    assert t1["model"]["top1"] > t1["frequency"]["top1"] + 0.15
    assert t1["model"]["top1"] > t1["markov"]["top1"] + 0.02
    assert t1["random"]["top1"] == pytest.approx(1 / 16)
    # the plug-in Bayes estimate is optimistic; 2^-H is below it (a lower bound, not a ceiling)
    b = r["tables"][0]["bayes"]
    plug = next(row for row in r["tables"][0]["rows"] if "plug-in" in row["name"])
    loo = next(row for row in r["tables"][0]["rows"] if "leave-one-out" in row["name"])
    assert loo["top1"] <= t1["2^-H(first"]["top1"] <= plug["top1"]
    assert 0 < b["singleton_share"] < 1


def test_pre_attention_learns_a_linear_gate(work):
    path = gen(work / "lin.parquet", spec(4, 16, 2), 60)          # attention_noise 0: gate = topk(W h + b)
    train("pre_attention", path, preset="tiny", train_overrides={"epochs": 30, "lr": 0.01}, output=work / "lin.pt",
          progress=False)
    r = evaluate(work / "lin.pt", measure=False)
    rows = {row["name"].split(" ")[0]: row for row in r["tables"][0]["rows"]}
    assert rows["model"]["exact"] > 0.75 and rows["model"]["1st∈set"] > 0.95
    assert rows["model"]["P@K"] > rows["markov"]["P@K"] + 0.3
    assert "Bayes," not in rows        # continuous context: no exact-context Bayes row


def test_same_seed_same_weights_and_metrics(tiny_trace, work):
    a = train("speculation", tiny_trace, preset="tiny", train_overrides={"epochs": 2}, progress=False)
    b = train("speculation", tiny_trace, preset="tiny", train_overrides={"epochs": 2}, progress=False)
    c = train("speculation", tiny_trace, preset="tiny", train_overrides={"epochs": 2, "seed": 1}, progress=False)
    assert a["val_score"] == b["val_score"] and a["split"] == b["split"]
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    assert c["split"] != a["split"] or any(not torch.equal(v, c["model_state"][k]) for k, v in a["model_state"].items())


def test_checkpoint_round_trip_gives_identical_predictions(tiny_ckpts, tiny_trace):
    path, _, ck, _ = tiny_ckpts
    data = load_trace(tiny_trace)
    s = spec_tensors(speculation_samples(data.requests, 4, 3, 2, True, 0))
    m1 = load_model(ck)
    m2 = load_model(torch.load(path, weights_only=True))
    l1, c1 = spec_predict(m1, s)
    l2, c2 = spec_predict(m2, s)
    assert np.array_equal(l1, l2) and np.array_equal(c1, c2)


@pytest.mark.parametrize("stop", ["epoch", "mid_epoch"])
def test_resume_continues_exactly(tiny_trace, work, stop):
    straight = train("speculation", tiny_trace, preset="tiny", train_overrides={"epochs": 3, "batch_size": 64},
                     progress=False)
    part = work / f"part-{stop}.pt"
    if stop == "epoch":
        train("speculation", tiny_trace, preset="tiny", train_overrides={"epochs": 1, "batch_size": 64}, output=part,
              progress=False)
    else:   # a time limit that stops after the first batch
        first = train("speculation", tiny_trace, preset="tiny", train_overrides={"epochs": 3, "batch_size": 64},
                      output=part, progress=False, time_limit_s=0.0)
        assert first["stopped"] == "time_limit" and first["history"][-1]["partial"]
    resumed = train("speculation", tiny_trace, resume=part, train_overrides={"epochs": 3}, output=part,
                    progress=False)
    assert resumed["best_epoch"] == straight["best_epoch"] and resumed["val_score"] == straight["val_score"]
    for k, v in straight["train_state"]["model"].items():
        assert torch.equal(v, resumed["train_state"]["model"][k]), k
    for k, v in straight["model_state"].items():
        assert torch.equal(v, resumed["model_state"][k]), k


# ---- evaluation and CLI ----------------------------------------------------------------------------

def test_eval_table_and_cli(tiny_trace, work):
    run = CliRunner()
    out = work / "cli.pt"
    res = run.invoke(predictor_cli, ["train", "speculation", "--trace", str(tiny_trace), "--preset", "tiny",
                                     "--epochs", "1", "--seed", "3", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "forward latency (cpu" in res.output
    res = run.invoke(predictor_cli, ["eval", str(out), "--no-latency"])
    assert res.exit_code == 0, res.output
    for word in ("offset 1", "offset 2", "model", "random", "frequency", "recency", "markov", "Bayes", "top1",
                 "leave-one-out", "lower bound"):
        assert word in res.output, word
    res = run.invoke(predictor_cli, ["eval", str(out), "--json", "--no-latency"])
    rep = json.loads(res.output)
    assert rep["split"] == "test" and rep["columns"][:2] == ["top1", "top3"] and len(rep["tables"]) == 2
    # errors: one line, exit 2
    res = run.invoke(predictor_cli, ["eval", str(tiny_trace)])
    assert res.exit_code == 2 and "not a readable checkpoint" in res.output
    res = run.invoke(predictor_cli, ["train", "speculation", "--trace", str(tiny_trace), "--preset", "huge",
                                     "-o", str(work / "x.pt")])
    assert res.exit_code == 2 and "unknown speculation preset" in res.output


def test_top_k_report_has_set_metrics(work):
    path = gen(work / "topk.parquet", spec(4, 16, 4), 6)
    train("speculation", path, preset="tiny", train_overrides={"epochs": 1}, model_overrides={"loss": "bce"},
          output=work / "topk.pt", progress=False)
    r = evaluate(work / "topk.pt", measure=False)
    assert r["columns"] == ["top1", "top3", "top5", "top10", "P@K", "exact", "R@K+2", "all@K+2", "1st∈set"]
    model = r["tables"][0]["rows"][0]
    assert 0 <= model["exact"] <= model["P@K"] <= model["R@K+2"] <= 1
    assert "random" in format_evaluation(r)


def test_pre_attention_needs_the_column(work):
    path = write_routing(work / "nopre.parquet", np.zeros((3, 4, 2, 1), dtype=np.int16), 2, 4)
    with pytest.raises(InputError) as e:
        train("pre_attention", path, preset="tiny", progress=False)
    assert str(path) in str(e.value) and e.value.field == "pre_attn"


# ---- in the simulator ------------------------------------------------------------------------------

def _run(trace, pred):
    return moesim.simulate(scenario(trace, gpu={"capacity_experts": 8}, batch={"size": 2}, predictor=pred))


def test_simulate_with_speculation(tiny_ckpts, tiny_trace):
    s_path = str(tiny_ckpts[0])
    a = _run(tiny_trace, {"name": "speculation", "checkpoint": s_path})
    b = _run(tiny_trace, {"name": "speculation", "checkpoint": s_path})
    assert a.summary == b.summary
    s = a.summary
    assert s["prefetch"]["issued"] > 0 and s["prediction"]["precision"] > 0.2
    # latency: measured at training time (stored in the checkpoint) unless the scenario sets it
    lat = tiny_ckpts[2]["latency"]
    assert lat["device"].startswith("cpu") and len(lat["us"]) == len(lat["tokens"])
    assert s["predictor_s"] > 0
    c = _run(tiny_trace, {"name": "speculation", "checkpoint": s_path, "latency_us": 0, "lookahead_layers": 1})
    assert c.summary["predictor_s"] == 0


def test_simulate_with_pre_attention(tiny_ckpts, tiny_trace):
    p_path = str(tiny_ckpts[1])
    r = _run(tiny_trace, {"name": "pre_attention", "checkpoint": p_path, "trace": str(tiny_trace)})
    s = r.summary
    assert s["prefetch"]["issued"] > 0 and s["prediction"]["recall"] > 0.5
    # a trace without pre_attn: a clear error naming it and the column
    other = write_routing(tiny_trace.parent / "nopre2.parquet", np.zeros((2, 4, 4, 1), dtype=np.int16), 2, 16)
    with pytest.raises(InputError) as e:
        _run(other, {"name": "pre_attention", "checkpoint": p_path, "trace": str(other)})
    assert str(other) in str(e.value) and "pre_attn" in str(e.value)


def test_pre_attention_reads_the_view_when_the_engine_provides_it(tiny_ckpts):
    m = ModelSpec(**TINY_MODEL)
    pred = registry.create("pre_attention", {"checkpoint": str(tiny_ckpts[1]), "latency_us": 0}, m,
                           np.random.default_rng(0))

    class View:
        step, phase = 0, "decode"
        request_ids = token_request_ids = np.array([0, 1])

        def pre_attn(self, layer):
            return np.ones((2, 8), dtype=np.float16) * layer

    out = pred.on_pre_attention(View(), 2)
    assert out and all(p.step == 0 and p.layer == 2 for p in out)


def test_checkpoint_for_another_model_is_a_clear_error(tiny_ckpts, tiny_trace):
    with pytest.raises(InputError) as e:
        registry.create("speculation", {"checkpoint": str(tiny_ckpts[0])}, spec(4, 32, 1),
                        np.random.default_rng(0))
    assert "trained for 4 MoE layers x 16 experts" in str(e.value) and e.value.field == "predictor.checkpoint"
    with pytest.raises(InputError, match="is a speculation checkpoint, not pre_attention"):
        registry.create("pre_attention", {"checkpoint": str(tiny_ckpts[0])}, ModelSpec(**TINY_MODEL),
                        np.random.default_rng(0))
    with pytest.raises(InputError, match="checkpoint file not found"):
        registry.create("speculation", {"checkpoint": "no/such.pt"}, ModelSpec(**TINY_MODEL), np.random.default_rng(0))


def test_checkpoint_path_names_the_model(tiny_ckpts, tmp_path):
    """`{model}` in checkpoint is the scenario's model: one sweep, one checkpoint per model."""
    m = ModelSpec(**TINY_MODEL)
    (tmp_path / f"{m.name}-spec.pt").write_bytes(tiny_ckpts[0].read_bytes())
    pred = registry.create("speculation", {"checkpoint": str(tmp_path / "{model}-spec.pt"), "latency_us": 0}, m,
                           np.random.default_rng(0))
    assert pred.ckpt_path == str(tmp_path / f"{m.name}-spec.pt")
    with pytest.raises(InputError, match="checkpoint file not found") as e:
        registry.create("speculation", {"checkpoint": str(tmp_path / "{model}-other.pt")}, m, np.random.default_rng(0))
    assert f"{m.name}-other.pt" in str(e.value)


def test_shipped_compare_sweep_runs_its_trained_checkpoints(monkeypatch):
    """scenarios/compare-predictors.yaml names one checkpoint per model via `{model}`: each loads for
    its model and predicts well on requests it was not trained on (same synthetic model: model_seed)."""
    from pathlib import Path

    from moesim.config import apply_overrides, scenario_from_dict
    from moesim.sweep.spec import load_sweep, override_strings

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)                       # checkpoint paths are relative to the working dir
    spec = load_sweep(root / "scenarios" / "compare-predictors.yaml")
    pts = [p for p in spec.points() if p.overrides["predictor"]["name"] in ("speculation", "pre_attention")]
    assert len(pts) == 4
    for p in pts:
        over = override_strings(p.overrides) + ["trace.synthetic.requests=4", "trace.synthetic.decode_len=16"]
        sc = scenario_from_dict(apply_overrides(spec.base, over), file=spec.file, base_dir=Path(spec.base_dir))
        s = moesim.simulate(sc).summary
        # measured 0.51-0.71; a checkpoint of another synthetic model scores 0.03 (Switch) to 0.25 (Qwen)
        assert s["prediction"]["precision"] > 0.4, (p.label, s["prediction"])


@pytest.mark.parametrize("name", ["speculation", "pre_attention"])
def test_on_the_gpu_they_take_the_prefetch_fast_path_with_simpys_results(tiny_ckpts, tiny_trace, name):
    """runs_on: gpu issues a hook's prefetches at once, so the learned predictors (their own
    latency tables, pre_attention's on_pre_attention hook) run on engine/fast_prefetch.py: the
    same summary and tables as the SimPy engine."""
    from moesim.engine.run import simulate

    pred = {"name": name, "checkpoint": str(tiny_ckpts[0 if name == "speculation" else 1]), "runs_on": "gpu"}
    if name == "pre_attention":
        pred["trace"] = str(tiny_trace)
    sc = scenario(tiny_trace, gpu={"capacity_experts": 8}, batch={"size": 2}, predictor=pred)
    fast, ref = simulate(sc, record_events=True), simulate(sc, record_events=True, engine="simpy")
    assert fast.engine == {"engine": "fast", "reason": None, "path": "prefetch"}
    assert fast.summary["prefetch"]["issued"] > 0 and fast.summary["predictor_s"] > 0
    assert json.dumps(fast.summary, sort_keys=True) == json.dumps(ref.summary, sort_keys=True)
    for t in ("steps", "requests", "events"):
        pd.testing.assert_frame_equal(getattr(fast, t), getattr(ref, t), check_exact=True)
