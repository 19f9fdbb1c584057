"""The MoE families `moesim trace collect` supports: how to find each one's routers (`Family`) and its
selection rule re-computed from router logits (`select_topk`, for routers of transformers < 5 that return
logits only). torch is imported inside `select_topk`."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Family:
    """One architecture family: how to find its routers and how its router selects experts."""

    name: str
    model_types: tuple[str, ...]
    router_classes: tuple[str, ...]    # router modules (transformers >= 5)
    block_classes: tuple[str, ...]     # MoE blocks whose `gate`/`router` child is the router (older releases)
    rule: str                          # see select_topk
    encoder_decoder: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("Mixtral", ("mixtral",), ("MixtralTopKRouter",), ("MixtralSparseMoeBlock",), "softmax_topk_norm"),
    Family("Qwen2-MoE", ("qwen2_moe",), ("Qwen2MoeTopKRouter",), ("Qwen2MoeSparseMoeBlock",), "softmax_topk"),
    Family("Qwen3-MoE", ("qwen3_moe",), ("Qwen3MoeTopKRouter",), ("Qwen3MoeSparseMoeBlock",), "softmax_topk"),
    Family("OLMoE", ("olmoe",), ("OlmoeTopKRouter",), ("OlmoeSparseMoeBlock",), "softmax_topk"),
    Family("PhiMoE", ("phimoe",), ("PhimoeTopKRouter",), ("PhimoeSparseMoeBlock",), "sparsemixer"),
    Family("DeepSeek-V2", ("deepseek_v2",), ("DeepseekV2TopkRouter",), ("DeepseekV2Moe", "DeepseekV2MoE"),
           "deepseek_v2"),
    Family("DeepSeek-V3", ("deepseek_v3",), ("DeepseekV3TopkRouter",), ("DeepseekV3MoE",), "deepseek_v3"),
    Family("GPT-OSS", ("gpt_oss",), ("GptOssTopKRouter",), ("GptOssMLP",), "topk_softmax"),
    Family("Switch Transformers", ("switch_transformers",), ("SwitchTransformersTop1Router",),
           ("SwitchTransformersSparseMLP",), "switch", encoder_decoder=True),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_text() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_for(model_type: str | None, file: str | None = None) -> Family:
    fam = _BY_TYPE.get(str(model_type))
    if fam is None:
        raise InputError(f"unsupported architecture {model_type!r}: supported model types are {supported_text()}",
                         file=file, field="model_type")
    return fam


# ---- the selection rules ------------------------------------------------------------------------

def select_topk(rule: str, logits, top_k: int, router=None, config=None):
    """The family's routing from its router logits `[N, E]` (torch): `(indices [N, K], weights [N, K])`
    in the router's own output order. Used for routers that return only logits (transformers < 5);
    `router`/`config` supply the family's parameters (norm_topk_prob, groups, bias, scaling)."""
    import torch

    def attr(name, default=None):
        for src in (router, config):
            if src is not None and getattr(src, name, None) is not None:
                return getattr(src, name)
        return default

    x = logits.float()
    if rule in ("softmax_topk", "softmax_topk_norm"):          # Mixtral, Qwen2/3-MoE, OLMoE
        probs = torch.softmax(x, dim=-1)
        w, idx = torch.topk(probs, top_k, dim=-1)
        if rule == "softmax_topk_norm" or attr("norm_topk_prob", False):
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, w
    if rule == "topk_softmax":                                 # GPT-OSS: top-k of logits, softmax over them
        v, idx = torch.topk(x, top_k, dim=-1)
        return idx, torch.softmax(v, dim=-1)
    if rule == "sparsemixer":                                  # PhiMoE (eval): top-1, then top-1 of the rest
        eps = float(attr("router_jitter_noise", 0.01))
        out_i, out_w = [], []
        masked = x
        for _ in range(top_k):
            thr, ind = masked.max(dim=-1, keepdim=True)
            factor = x.abs().clamp(min=thr)
            mask = ((thr - x) / factor) > (2 * eps)
            gates = torch.softmax(masked.masked_fill(mask, float("-inf")), dim=-1)
            out_i.append(ind)
            out_w.append(gates.gather(-1, ind))
            masked = torch.scatter(masked, -1, ind, float("-inf"))
        return torch.cat(out_i, dim=-1), torch.cat(out_w, dim=-1)
    if rule == "deepseek_v2":
        scores = torch.softmax(x, dim=-1)
        method = attr("topk_method", "greedy")
        if method == "group_limited_greedy":
            g, tg = int(attr("n_group", attr("num_group"))), int(attr("topk_group"))
            E = scores.shape[-1]
            gs = scores.view(-1, g, E // g).max(dim=-1).values
            gidx = torch.topk(gs, k=tg, dim=-1).indices
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
            smask = gmask.unsqueeze(-1).expand(-1, g, E // g).reshape(-1, E)
            scores = scores.masked_fill(~smask.bool(), 0.0)
        w, idx = torch.topk(scores, k=top_k, dim=-1)
        return idx, w * float(attr("routed_scaling_factor", 1.0))
    if rule == "deepseek_v3":
        scores = torch.sigmoid(x)
        bias = attr("e_score_correction_bias")
        choice = scores + (bias.float().to(scores.device) if bias is not None else 0.0)
        g, tg = int(attr("n_group", attr("num_group", 1))), int(attr("topk_group", 1))
        E = scores.shape[-1]
        gs = choice.view(-1, g, E // g).topk(2, dim=-1)[0].sum(dim=-1)
        gidx = torch.topk(gs, k=tg, dim=-1).indices
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
        smask = gmask.unsqueeze(-1).expand(-1, g, E // g).reshape(-1, E)
        choice = choice.masked_fill(~smask.bool(), float("-inf"))   # 5.x; DeepSeek's own code used 0.0
        idx = torch.topk(choice, k=top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if attr("norm_topk_prob", False):
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * float(attr("routed_scaling_factor", 1.0))
    if rule == "switch":
        probs = torch.softmax(x, dim=-1)
        w, idx = probs.max(dim=-1, keepdim=True)
        return idx, w
    raise ValueError(f"unknown routing rule {rule!r}")
