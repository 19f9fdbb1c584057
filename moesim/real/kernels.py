"""The compute the real executor runs and the profiler times: one code path for both.

A transformer block of the (possibly scaled) model, with random weights:

    attention segment:  h = rms_norm(x); x += attention(h) (QKV, SDPA over the KV cache, O);
                        h = rms_norm(x)                       -> routing is known (the gate)
    MoE segment:        x[idx_e] += expert_e(h[idx_e]) / top_k for every routed expert e
                        (+ shared experts over all tokens)

Weights are stored (out_features, in_features) and applied with F.linear, as in PyTorch/HF
checkpoints (on CPU, `x @ W` with W (in, out) is up to 4x slower for one token). An expert's weights
live in one flat byte buffer (a cache slot): W1 [I, H], W3 [I, H] (SwiGLU only) and W2 [H, I],
back to back, padded to a multiple of 4096 bytes (O_DIRECT alignment).
"""
from __future__ import annotations

import math

from .torchutil import DTYPES, require_torch

ALIGN = 4096


def padded(nbytes: int, align: int = ALIGN) -> int:
    return -(-nbytes // align) * align


class Shapes:
    """The tensor shapes of a ModelSpec in a given dtype."""

    def __init__(self, model, dtype: str = "bfloat16"):
        self.model = model
        self.dtype_name = dtype
        self.esize = DTYPES[dtype]
        self.H, self.I = model.hidden_size, model.expert_intermediate_size
        self.gated = model.gated
        self.mats = model.matrices_per_expert
        self.nh, self.kvh, self.hd = model.num_heads, model.num_kv_heads, model.head_dim
        self.expert_numel = self.mats * self.H * self.I
        self.expert_nbytes = self.expert_numel * self.esize    # real bytes of one expert in this dtype
        self.slot_bytes = padded(self.expert_nbytes)            # what is stored/read/copied per expert


def expert_views(buf, shapes: Shapes, dtype):
    """(w1, w3 or None, w2) views of a flat uint8 tensor `buf` holding one expert."""
    H, I = shapes.H, shapes.I
    flat = buf[: shapes.expert_nbytes].view(dtype)
    w1 = flat[: H * I].view(I, H)
    if shapes.gated:
        w3 = flat[H * I: 2 * H * I].view(I, H)
        w2 = flat[2 * H * I: 3 * H * I].view(H, I)
    else:
        w3 = None
        w2 = flat[H * I: 2 * H * I].view(H, I)
    return w1, w3, w2


def ffn(xs, w1, w3, w2):
    """SwiGLU (w3 given) or ReLU MLP; weights (out, in)."""
    F = require_torch().nn.functional
    a = F.linear(xs, w1)
    if w3 is not None:
        a = F.silu(a)
        a.mul_(F.linear(xs, w3))
    else:
        a.relu_()
    return F.linear(a, w2)


def expert_forward(h, idx, views, x, alpha: float):
    """One routed expert over the tokens `idx` of `h`; its output is added into `x[idx]`."""
    xs = h.index_select(0, idx)
    y = ffn(xs, *views)
    x.index_add_(0, idx, y, alpha=alpha)


def rms_norm(x, eps: float = 1e-6):
    torch = require_torch()
    f = getattr(torch.nn.functional, "rms_norm", None)
    if f is not None:
        return f(x, (x.shape[-1],), eps=eps)
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def random_weight(shape, dtype, device, gen):
    """N(0, 1/fan_in) weights of shape (out, in) (keeps activations O(1) through random layers)."""
    torch = require_torch()
    w = torch.randn(*shape, generator=gen, dtype=torch.float32)
    w.mul_(1.0 / math.sqrt(shape[1]))
    return w.to(dtype=dtype, device=device)


def _sdpa(q, k, v, mask):
    torch = require_torch()
    F = torch.nn.functional
    if q.shape[1] != k.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        except TypeError:  # torch < 2.5
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCache:
    """K and V of one layer for a static batch: [slots, kv_heads, max_len, head_dim]."""

    def __init__(self, slots: int, max_len: int, shapes: Shapes, dtype, device):
        torch = require_torch()
        self.k = torch.zeros(slots, shapes.kvh, max_len, shapes.hd, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)


class StepGeometry:
    """Where each token row of a step goes in the padded [slots, positions] layout, and the
    attention mask; built once per step, shared by every layer."""

    def __init__(self, slot_of_row, pos_of_row, lengths_after, device, prefill: bool):
        torch = require_torch()
        import numpy as np

        self.prefill = prefill
        slot_of_row = np.asarray(slot_of_row, dtype=np.int64)
        pos_of_row = np.asarray(pos_of_row, dtype=np.int64)
        self.b = torch.as_tensor(slot_of_row, device=device)
        self.p = torch.as_tensor(pos_of_row, device=device)
        self.slots = np.unique(slot_of_row)                    # slots taking part (sorted)
        self.slot_t = torch.as_tensor(self.slots, device=device)
        # row -> index among the taking-part slots
        self.bi = torch.as_tensor(np.searchsorted(self.slots, slot_of_row), device=device)
        self.ctx = int(lengths_after.max())                    # key positions to attend over
        lens = torch.as_tensor(lengths_after, device=device)   # per taking-part slot
        keys = torch.arange(self.ctx, device=device)
        if prefill:
            # queries at positions 0..ctx-1 (padded); causal and within the sequence
            self.q_len = self.ctx
            qpos = keys[:, None]
            mask = (keys[None, :] <= qpos)[None] & (keys[None, None, :] < lens[:, None, None])
        else:
            self.q_len = 1
            mask = (keys[None, None, :] < lens[:, None, None])
        self.mask = mask[:, None]                              # [B, 1, q_len, ctx]
        self.contiguous = bool(len(self.slots) == int(self.slots[-1]) + 1 and self.slots[0] == 0)


class Attention:
    """One attention block with a fused QKV projection; K/V appended to a KVCache."""

    def __init__(self, shapes: Shapes, dtype, device, gen):
        s = shapes
        self.s = s
        self.wqkv = random_weight(((s.nh + 2 * s.kvh) * s.hd, s.H), dtype, device, gen)
        self.wo = random_weight((s.H, s.nh * s.hd), dtype, device, gen)

    def __call__(self, h, cache: KVCache, g: StepGeometry):
        torch = require_torch()
        s = self.s
        F = torch.nn.functional
        T = h.shape[0]
        qkv = F.linear(h, self.wqkv)
        q = qkv[:, : s.nh * s.hd].view(T, s.nh, s.hd)
        k = qkv[:, s.nh * s.hd: (s.nh + s.kvh) * s.hd].view(T, s.kvh, s.hd)
        v = qkv[:, (s.nh + s.kvh) * s.hd:].view(T, s.kvh, s.hd)
        cache.k[g.b, :, g.p] = k
        cache.v[g.b, :, g.p] = v
        B = len(g.slots)
        if g.contiguous:
            kc, vc = cache.k[:B, :, : g.ctx], cache.v[:B, :, : g.ctx]
        else:
            kc, vc = cache.k[g.slot_t, :, : g.ctx], cache.v[g.slot_t, :, : g.ctx]
        qp = torch.zeros(B, g.q_len, s.nh, s.hd, dtype=h.dtype, device=h.device)
        qp[g.bi, g.p if g.prefill else 0] = q
        o = _sdpa(qp.transpose(1, 2), kc, vc, g.mask)          # [B, nh, q_len, hd]
        rows = o.transpose(1, 2)[g.bi, g.p if g.prefill else 0]  # [T, nh, hd]
        return F.linear(rows.reshape(T, s.nh * s.hd), self.wo)


def attention_segment(x, attn: Attention, cache: KVCache, g: StepGeometry):
    """Pre-attention norm, attention, residual, post-attention norm: returns the MoE input."""
    h = rms_norm(x)
    x.add_(attn(h, cache, g))
    return rms_norm(x)


def lm_head(x, w):
    """Final norm and the vocabulary projection (w: [vocab, hidden])."""
    return require_torch().nn.functional.linear(rms_norm(x), w)
