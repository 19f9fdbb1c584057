"""Losses (torch). Speculation: cross-entropy with label smoothing (seed 000) or multi-label BCE,
plus the confidence head's BCE. Pre-attention (seed 003 §4.5): MSE on gate scores, weighted BCE,
focal loss, and ranking-aware BCE (weighted BCE + λ · pairwise margin ranking).

Seed 003 weights experts by their rank in the *full* gate-score vector (top-10: 3.0, 11-30: 1.5,
rest 0.5). A trace that stores all `num_experts` scores gives that ranking; one that stores only
the routed experts (or no scores) gives only the routed set in gate order, so the "top-10" tier
becomes the routed set and the ranking pairs are the routed experts' pairs in gate order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_hot(sets: torch.Tensor, E: int) -> torch.Tensor:
    """[..., K] expert ids -> [..., E] 0/1 float."""
    out = torch.zeros(*sets.shape[:-1], E, device=sets.device)
    return out.scatter_(-1, sets, 1.0)


def speculation_loss(cfg, logits, conf, tgt_e, tgt_mask):
    """logits [B, H, E], conf [B, H], tgt_e [B, H, K], tgt_mask [B, H] bool -> (loss, main part)."""
    E, K = cfg.num_experts, cfg.top_k
    lg = logits[tgt_mask]                 # [n, E]
    te = tgt_e[tgt_mask]                  # [n, K]
    if lg.shape[0] == 0:
        z = logits.sum() * 0.0
        return z, z
    eps = cfg.label_smoothing
    if cfg.loss == "ce":
        if K == 1:
            main = F.cross_entropy(lg, te[:, 0], label_smoothing=eps)
        else:
            target = multi_hot(te, E) / K
            target = target * (1 - eps) + eps / E
            main = -(target * F.log_softmax(lg, dim=-1)).sum(-1).mean()
    else:
        target = multi_hot(te, E)
        target = target * (1 - eps) + eps * (K / E)
        main = F.binary_cross_entropy_with_logits(lg, target, reduction="sum") / (lg.shape[0] * K)
    loss = main
    if cfg.confidence_weight > 0:
        with torch.no_grad():
            correct = (lg.argmax(-1, keepdim=True) == te).any(-1).float()
        loss = loss + cfg.confidence_weight * F.binary_cross_entropy(conf[tgt_mask].clamp(1e-6, 1 - 1e-6), correct)
    return loss, main


def _ranked(sets: torch.Tensor, scores: torch.Tensor | None, E: int, depth: int) -> torch.Tensor:
    """The best `depth` experts by true gate score when the scores cover every expert, else the
    routed set in gate order. [B, <=depth]."""
    if scores is not None and scores.shape[-1] == E:
        return torch.topk(scores, min(depth, E), dim=-1).indices
    return sets[:, :depth]


def pre_attention_loss(cfg, logits, sets, scores=None):
    """logits [B, E], sets [B, K] (gate order), scores [B, W] or None."""
    E, K = cfg.num_experts, cfg.top_k
    y = multi_hot(sets, E)
    if cfg.loss == "mse":
        if scores is not None and scores.shape[-1] == E:
            target = scores
        elif scores is not None and scores.shape[-1] == K:
            target = torch.zeros_like(y).scatter_(-1, sets, scores)
        else:
            target = y
        return F.mse_loss(torch.sigmoid(logits), target, reduction="sum") / logits.shape[0]
    if cfg.loss == "focal":
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        pt = p * y + (1 - p) * (1 - y)
        alpha = cfg.focal_alpha * y + (1 - cfg.focal_alpha) * (1 - y)
        return (alpha * (1 - pt) ** cfg.focal_gamma * ce).mean()
    w = torch.full_like(y, 0.5)
    top10 = _ranked(sets, scores, E, 10)
    w.scatter_(-1, top10, 3.0)
    if cfg.loss == "ranking":
        if scores is not None and scores.shape[-1] == E:
            top30 = _ranked(sets, scores, E, 30)
            w2 = torch.full_like(y, 0.5).scatter_(-1, top30, 1.5)
            w = torch.maximum(w2, torch.zeros_like(w).scatter_(-1, top10, 3.0))
    bce = (w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
    if cfg.loss == "wbce":
        return bce
    # ranking-aware: pairs (j, k) among the ranked experts with j ranked above k
    order = _ranked(sets, scores, E, 10)
    s = torch.gather(logits, -1, order)                     # [B, m], best first
    m = s.shape[-1]
    if m < 2:
        return bce
    diff = s.unsqueeze(-1) - s.unsqueeze(-2)                 # [B, m, m]: s_j - s_k
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=logits.device), diagonal=1)
    rank = F.relu(cfg.ranking_margin - diff[:, upper]).mean()
    return bce + cfg.ranking_lambda * rank
