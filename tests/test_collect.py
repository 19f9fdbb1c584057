"""`moesim trace collect` on tiny randomly initialised models of every supported family (no download).

Every recorded expert set is checked against the router's top-k recomputed here, in NumPy, from the
captured logits with each family's own rule (normalisation quirks, DeepSeek groups and bias, PhiMoE
sparsemixer, GPT-OSS top-k-then-softmax, Switch top-1) — independently of moesim's code.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from moesim.errors import InputError  # noqa: E402
from moesim.traces import TraceReader, read_requests  # noqa: E402
from moesim.routing.collect import (FAMILIES, collect_from_model, family_for, select_topk,  # noqa: E402
                                   write_collected)
from moesim.traces.schema import TraceMeta  # noqa: E402

E, K, V = 8, 2, 96
PROMPTS = [[5, 17, 3, 44, 9, 61], [7, 2, 80]]
NEW = 4
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
              eos_token_id=None)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
           num_key_value_heads=4, num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=1,
           moe_intermediate_size=16, n_routed_experts=E)


def _cfg(kind: str):
    T = transformers
    c = dict(COMMON)
    if kind == "mixtral":
        return T.MixtralConfig(**c, num_local_experts=E, num_experts_per_tok=K)
    if kind == "qwen2_moe":
        return T.Qwen2MoeConfig(**c, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=16,
                                shared_expert_intermediate_size=16, norm_topk_prob=False)
    if kind == "qwen3_moe":
        return T.Qwen3MoeConfig(**c, num_experts=E, num_experts_per_tok=3, moe_intermediate_size=16, head_dim=8,
                                norm_topk_prob=True)
    if kind == "olmoe":
        return T.OlmoeConfig(**c, num_experts=E, num_experts_per_tok=K)
    if kind == "phimoe":
        return T.PhimoeConfig(**c, num_local_experts=E, num_experts_per_tok=2)
    if kind == "deepseek_v2":
        c.update(MLA)
        return T.DeepseekV2Config(**c, num_experts_per_tok=K, topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2, routed_scaling_factor=1.5)
    if kind == "deepseek_v3":
        c.update(MLA)
        return T.DeepseekV3Config(**c, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                                  routed_scaling_factor=2.5)
    if kind == "gpt_oss":
        return T.GptOssConfig(**c, num_local_experts=E, num_experts_per_tok=K, head_dim=8)
    raise KeyError(kind)


CAUSAL = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


def _randomise_routers(model, seed=0):
    """Router weights (and biases) ~ N(0, 1): clearly separated logits, so no near-ties."""
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith(("Router", "TopkRouter", "Top1Router")):
            for pname, p in mod.named_parameters(recurse=True):
                p.data = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if hasattr(mod, "e_score_correction_bias"):   # DeepSeek-V3 load-balancing bias
                mod.e_score_correction_bias.data = 0.3 * torch.randn(mod.e_score_correction_bias.shape, generator=g)


def _causal(kind):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_cfg(kind))
    _randomise_routers(model)
    return model.eval()


def _switch(sparse_step=2):
    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(vocab_size=V, d_model=32, d_kv=8, d_ff=32, num_layers=4,
                                                num_decoder_layers=4, num_heads=4, num_experts=E,
                                                encoder_sparse_step=sparse_step, decoder_sparse_step=sparse_step,
                                                router_jitter_noise=0.5, expert_capacity=64)
    model = transformers.SwitchTransformersForConditionalGeneration(cfg)
    _randomise_routers(model)
    return model.eval()


# ---- the independent reference -------------------------------------------------------------------------

def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top(v, k):
    return list(np.argsort(-v, kind="stable")[:k])


def reference(kind: str, logits: np.ndarray, k: int, cfg, router) -> tuple[list[int], list[float]]:
    """(selected experts, their gate weights) for one token's logits [E], written from the papers/model code."""
    x = logits.astype(np.float64)
    if kind in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        p = _softmax(x)
        sel = _top(p, k)
        w = p[sel]
        if kind == "mixtral" or getattr(cfg, "norm_topk_prob", False):
            w = w / w.sum()
        return sel, list(w)
    if kind == "gpt_oss":
        sel = _top(x, k)
        return sel, list(_softmax(x[sel]))
    if kind == "phimoe":   # sparsemixer, eval: top-1 logit, then top-1 of the rest; weights from masked softmaxes
        eps = cfg.router_jitter_noise
        sel, w, masked = [], [], x.copy()
        for _ in range(2):
            j = int(np.argmax(masked))
            m = masked[j]
            keep = (m - x) / np.maximum(np.abs(x), m) <= 2 * eps
            g = np.where(keep, masked, -np.inf)
            w.append(_softmax(g)[j])
            sel.append(j)
            masked = masked.copy()
            masked[j] = -np.inf
        return sel, w
    if kind == "deepseek_v2":   # softmax; keep the topk_group groups with the highest max; top-k; scale
        p = _softmax(x)
        groups = p.reshape(cfg.n_group, -1)
        keep = _top(groups.max(axis=1), cfg.topk_group)
        mask = np.zeros_like(groups)
        mask[keep] = 1
        q = np.where(mask.reshape(-1) > 0, p, 0.0)
        sel = _top(q, k)
        return sel, list(p[sel] * cfg.routed_scaling_factor)
    if kind == "deepseek_v3":   # sigmoid + bias for choice; groups by the sum of their top-2; weights w/o bias
        s = 1 / (1 + np.exp(-x))
        c = s + router.e_score_correction_bias.detach().double().numpy()
        groups = c.reshape(cfg.n_group, -1)
        keep = _top(np.sort(groups, axis=1)[:, -2:].sum(axis=1), cfg.topk_group)
        mask = np.zeros_like(groups)
        mask[keep] = 1
        q = np.where(mask.reshape(-1) > 0, c, -np.inf)   # experts of other groups can never be chosen
        sel = _top(q, k)
        w = s[sel]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        return sel, list(w * cfg.routed_scaling_factor)
    if kind == "switch":
        p = _softmax(x)
        j = int(np.argmax(p))
        return [j], [p[j]]
    raise KeyError(kind)


def _routers(model):
    return [m for _, m in model.named_modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter",
                                                                              "Top1Router"))]


def check_against_reference(kind, model, reqs, k, routers):
    cfg = model.config
    n = 0
    for r in reqs:
        T, L, kk = r.experts.shape
        assert kk == k and L == len(routers)
        for t in range(T):
            for layer in range(L):
                lg = r.logits[t, layer]
                sel, w = reference(kind, lg, k, cfg, routers[layer])
                got = r.experts[t, layer].tolist()
                assert sorted(got) == sorted(sel), (kind, r.request_id, t, layer, got, sel)
                # gate-score order: descending router logit
                assert got == sorted(got, key=lambda e: -lg[e]), (kind, t, layer, got)
                ref_w = dict(zip(sel, w))
                np.testing.assert_allclose(r.weights[t, layer], [ref_w[e] for e in got], rtol=2e-4, atol=1e-6)
                n += 1
    return n


# ---- tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CAUSAL)
def test_recorded_experts_match_the_routers_topk(kind, tmp_path):
    model = _causal(kind)
    reqs, info = collect_from_model(model, PROMPTS, NEW, pre_attn=True)
    k = model.config.num_experts_per_tok
    routers = _routers(model)
    moe_layers = 2      # DeepSeek: 3 blocks, block 0 dense
    assert info.family is family_for(kind)
    assert (info.num_layers, info.num_experts, info.top_k) == (moe_layers, E, k)
    assert [r.tokens for r in reqs] == [len(p) + NEW for p in PROMPTS]
    assert [r.prompt_len for r in reqs] == [len(p) for p in PROMPTS]
    assert check_against_reference(kind, model, reqs, k, routers) == sum(r.tokens for r in reqs) * moe_layers
    # the fallback for routers that return only logits (older transformers) agrees with the routers
    for r in reqs:
        for layer in range(moe_layers):
            idx, w = select_topk(info.family.rule, torch.from_numpy(r.logits[:, layer]), k, routers[layer],
                                 model.config)
            lg = torch.from_numpy(r.logits[:, layer])
            order = torch.sort(lg.gather(-1, idx), dim=-1, descending=True, stable=True).indices
            assert (idx.gather(-1, order).numpy() == r.experts[:, layer]).all()
            np.testing.assert_allclose(w.gather(-1, order).numpy(), r.weights[:, layer], rtol=2e-4, atol=1e-6)
    # through the file: experts, all logits as scores, pre_attn
    meta = TraceMeta(model=kind, num_layers=info.num_layers, num_experts=E, top_k=k, source="test")
    path = write_collected(tmp_path / "t.parquet", reqs, meta, scores="logits", pre_attn=True)
    back = read_requests(path)
    for a, b in zip(reqs, back):
        assert (a.experts == b.experts).all() and a.prompt_len == b.prompt_len
        np.testing.assert_array_equal(a.logits, b.scores)
        assert b.pre_attn.dtype == np.float16 and b.pre_attn.shape == (a.tokens, moe_layers, 32)


def test_decoding_is_greedy_and_the_cache_routes_like_a_full_forward():
    model = _causal("mixtral")
    reqs, _ = collect_from_model(model, PROMPTS[:1], NEW, pre_attn=True)
    r = reqs[0]
    prompt = torch.tensor([PROMPTS[0]])
    gen = model.generate(prompt, max_new_tokens=NEW, do_sample=False)[0].tolist()
    assert r.input_ids == gen and len(gen) == len(PROMPTS[0]) + NEW
    # routing recorded token by token (KV cache) == one forward over the whole sequence
    full, _ = collect_from_model(model, [r.input_ids], 0, pre_attn=True)
    np.testing.assert_allclose(full[0].logits, r.logits, rtol=1e-4, atol=1e-5)
    assert (full[0].experts == r.experts).all()
    # pre_attn of MoE layer 0 is the first block's input layernorm of the embeddings
    with torch.no_grad():
        ln = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([r.input_ids])))[0]
    np.testing.assert_allclose(r.pre_attn[:, 0].astype(np.float32), ln.numpy(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("stack", ["decoder", "encoder"])
def test_switch_transformers_stacks(stack):
    model = _switch(sparse_step=2)       # blocks 1 and 3 of each stack are sparse
    reqs, info = collect_from_model(model, PROMPTS, NEW, stack=stack, pre_attn=True)
    assert (info.num_layers, info.num_experts, info.top_k) == (2, E, 1)
    assert all(f".block.{i}." in n for n, i in zip(info.routers, (1, 3)))
    assert all(n.startswith(stack) for n in info.routers)
    if stack == "encoder":
        assert [r.tokens for r in reqs] == [len(p) for p in PROMPTS]
    else:   # the decoder start token, then the generated tokens
        assert [(r.prompt_len, r.tokens) for r in reqs] == [(1, 1 + NEW)] * 2
    assert model.config.router_jitter_noise > 0   # eval mode turns it off: routing is reproducible
    again, _ = collect_from_model(model, PROMPTS, NEW, stack=stack)
    assert all((a.experts == b.experts).all() for a, b in zip(reqs, again))
    assert check_against_reference("switch", model, reqs, 1, [None, None]) > 0


def test_unsupported_architecture_lists_the_supported_ones():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(InputError) as e:
        collect_from_model(model, PROMPTS, 1)
    msg = str(e.value)
    assert "'llama'" in msg
    for f in FAMILIES:
        assert f.name in msg


def test_cli_collect_from_a_local_model_dir(tmp_path):
    from moesim.cli.trace_sources import _standalone

    model = _causal("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": p}) for p in PROMPTS) + "\n")
    out = tmp_path / "c.parquet"
    res = CliRunner().invoke(_standalone, ["collect", "--model", str(tmp_path / "m"), "--prompts", str(prompts),
                                           "--max-new-tokens", "3", "--pre-attn", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rd = TraceReader(out)
    assert (rd.meta.num_layers, rd.meta.num_experts, rd.meta.top_k) == (2, E, K)
    assert rd.meta.source == f"collected:{tmp_path / 'm'}@p.jsonl" and rd.has_pre_attn and rd.has_scores
    reqs = read_requests(out)
    assert [r.tokens for r in reqs] == [len(p) + 3 for p in PROMPTS]
    # bad inputs: one line, exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": "x"}\n')
    res = CliRunner().invoke(_standalone, ["collect", "--model", str(tmp_path / "m"), "--prompts", str(bad),
                                           "-o", str(out)])
    assert res.exit_code == 2 and "line 2" in res.output and "input_ids" in res.output
    big = tmp_path / "big.jsonl"
    big.write_text('{"input_ids": [1, 2000]}\n')
    res = CliRunner().invoke(_standalone, ["collect", "--model", str(tmp_path / "m"), "--prompts", str(big),
                                           "-o", str(out)])
    assert res.exit_code == 2 and "vocab_size" in res.output
    res = CliRunner().invoke(_standalone, ["collect", "--model", str(tmp_path / "nope"), "--prompts", str(prompts),
                                           "-o", str(out)])
    assert res.exit_code == 2 and "--model" in res.output
