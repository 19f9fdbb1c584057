"""The torch models (imported only when a neural predictor is trained, evaluated or simulated)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import PreAttentionConfig, SpeculationConfig


def sinusoidal(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of integer positions [...] -> [..., dim] (any position, no table)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / max(half, 1)))
    ang = pos.to(torch.float32).unsqueeze(-1) * freq
    out = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    if dim % 2:
        out = torch.nn.functional.pad(out, (0, 1))
    return out


class SpeculationModel(nn.Module):
    """Inter-layer speculation (seeds 000/002), per token:

    x_c = sum_k w_k * emb(expert_k at slot c) + emb(layer of slot c) + sin(token position of slot c)
    h   = TransformerEncoder(x) over the C context slots (padding masked)
    q_d = h[newest] + emb(target layer of offset d) + emb(offset d)          d = 1..H
    z_d = LayerNorm(q_d + CrossLayerAttention(q_d, h, h))
    logits_d = head(z_d) (per target layer), confidence_d = sigmoid(w·z_d)
    """

    def __init__(self, cfg: SpeculationConfig):
        super().__init__()
        self.cfg = cfg
        L, E, K, D = cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.model_dim
        rows = L * E if cfg.per_layer_experts else E
        self.expert_embedding = nn.Embedding(rows + 1, D)             # last row: padding
        self.rank_weight = nn.Parameter(torch.ones(K, 1) / K)         # gate-order weights of the K experts
        self.layer_embedding = nn.Embedding(L + 1, D)
        self.offset_embedding = nn.Embedding(cfg.horizon, D)
        if cfg.num_attention_layers > 0:
            layer = nn.TransformerEncoderLayer(D, cfg.num_heads, cfg.ff_dim, cfg.dropout, activation="gelu",
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, cfg.num_attention_layers, enable_nested_tensor=False)
        else:
            self.encoder = None
        self.cross_layer_attention = nn.MultiheadAttention(D, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.dropout = nn.Dropout(cfg.dropout)
        heads = L if cfg.per_layer_head else 1
        self.head_weight = nn.Parameter(torch.empty(D, heads * E))
        self.head_bias = nn.Parameter(torch.zeros(heads * E))
        nn.init.normal_(self.head_weight, std=D ** -0.5)
        self.confidence_head = nn.Linear(D, 1)

    def forward(self, ctx_e, ctx_l, ctx_t, ctx_mask, tgt_l):
        """ctx_e [B, C, K] expert ids, ctx_l/ctx_t [B, C], ctx_mask [B, C] bool, tgt_l [B, H].
        Returns logits [B, H, E] and confidence [B, H]."""
        cfg = self.cfg
        L, E = cfg.num_layers, cfg.num_experts
        B = ctx_e.shape[0]
        pad = self.expert_embedding.num_embeddings - 1
        idx = ctx_e + ctx_l.unsqueeze(-1) * E if cfg.per_layer_experts else ctx_e
        idx = torch.where(ctx_mask.unsqueeze(-1), idx, torch.full_like(idx, pad))
        x = (self.expert_embedding(idx) * self.rank_weight).sum(dim=2)
        layers = torch.where(ctx_mask, ctx_l, torch.full_like(ctx_l, L))
        x = x + self.layer_embedding(layers) + sinusoidal(ctx_t, cfg.model_dim)
        x = self.dropout(x)
        pad_mask = ~ctx_mask
        h = self.encoder(x, src_key_padding_mask=pad_mask) if self.encoder is not None else x
        H = tgt_l.shape[1]
        q = h[:, -1:, :] + self.layer_embedding(tgt_l) + self.offset_embedding.weight[:H].unsqueeze(0)
        a, _ = self.cross_layer_attention(q, h, h, key_padding_mask=pad_mask, need_weights=False)
        z = self.dropout(self.norm(q + a))                               # [B, H, D]
        out = z @ self.head_weight + self.head_bias                      # [B, H, heads*E]
        if cfg.per_layer_head:
            out = out.view(B, H, L, E)
            logits = torch.gather(out, 2, tgt_l.view(B, H, 1, 1).expand(B, H, 1, E)).squeeze(2)
        else:
            logits = out
        conf = torch.sigmoid(self.confidence_head(z)).squeeze(-1)
        return logits, conf


class PreAttentionNet(nn.Module):
    """One router per MoE layer on the pre-attention hidden state (seed 003, architectures 1 and 2)."""

    def __init__(self, cfg: PreAttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(self._one(cfg) for _ in range(cfg.num_layers))

    @staticmethod
    def _one(cfg: PreAttentionConfig) -> nn.Module:
        d, h, E = cfg.input_dim, cfg.hidden, cfg.num_experts
        if cfg.arch == 1:
            return nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(h, E))
        return nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, E))

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x [B, d] of one layer -> expert scores [B, E]."""
        return self.layers[layer](x)


def build_model(cfg) -> nn.Module:
    if isinstance(cfg, SpeculationConfig):
        return SpeculationModel(cfg)
    if isinstance(cfg, PreAttentionConfig):
        return PreAttentionNet(cfg)
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
