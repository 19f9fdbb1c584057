"""Cost functions: how long a transfer, an expert FFN or an attention block takes.

Measured tables from the profile win (for the model they were measured on); otherwise a roofline:
time = launch overhead + max(FLOPs / peak FLOP/s, bytes moved / HBM bandwidth)
(Williams, Waterman & Patterson, "Roofline", CACM 2009).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..models import ModelSpec
from .profile import HardwareProfile, Table
from .runtime import RuntimeCosts


def transfer_s(nbytes: float, bandwidth_gbps: float, latency_us: float) -> float:
    """DESIGN §2: latency_us·1e-6 + B / (b·1e9) seconds."""
    return latency_us * 1e-6 + nbytes / (bandwidth_gbps * 1e9)


def _interp_ms(table: Table, x: float) -> float:
    xs, ys = table.tokens, table.ms
    if len(xs) == 1:
        return ys[0] * (x / xs[0]) if x > xs[0] else ys[0]
    if x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])  # linear extrapolation past the last point
    return ys[-1] + slope * (x - xs[-1])


class CostModel:
    """Per-model, per-profile timing. Results are memoised by token count (hot path)."""

    def __init__(self, model: ModelSpec, hw: HardwareProfile, runtime: RuntimeCosts | None = None):
        self.model, self.hw, self.runtime = model, hw, runtime
        rt = runtime or RuntimeCosts()
        self._eff = {"experts": rt.expert_efficiency, "dense": rt.expert_efficiency,
                     "attention": rt.attention_efficiency}
        self._rt = rt
        g = hw.gpu
        self._peak = g.peak_bf16_tflops * 1e12
        self._bw = g.hbm_bandwidth_gbps * 1e9
        self._launch = g.kernel_launch_us * 1e-6
        meas = hw.measured
        applies = meas is not None and (meas.model is None or meas.model == model.name)
        self._expert_table = meas.expert_compute_ms if applies else None
        self._attn_table = meas.attention_ms if applies else None
        self.uses_measured = {"expert_compute": self._expert_table is not None,
                              "attention": self._attn_table is not None}
        self.expert_compute_s = lru_cache(maxsize=None)(self._expert_compute_s)
        self.shared_compute_s = lru_cache(maxsize=None)(self._shared_compute_s)
        self.dense_ffn_s = lru_cache(maxsize=None)(self._dense_ffn_s)

    def _roofline(self, flops: float, nbytes: float, kernels: int) -> float:
        return kernels * self._launch + max(flops / self._peak, nbytes / self._bw)

    def _dequant_s(self, component: str, params: int) -> float:
        """GPU time to dequantise `params` weights of `component` (its format's runtime speed)."""
        m = self.model
        return self._rt.dequant_s(m.weight_format(component), params * m.component_bytes_per_param(component))

    def _ffn(self, tokens: int, params: int, kernels: int, component: str = "dense") -> float:
        """An FFN's roofline at the runtime's achieved efficiency, plus dequantising its weights."""
        m = self.model
        act_bytes = 2 * tokens * m.hidden_size * 2  # bf16 activations in and out
        t = self._roofline(2.0 * tokens * params, params * m.component_bytes_per_param(component) + act_bytes,
                           kernels)
        if self.runtime is None:
            return t
        return t / self._eff[component] + self._dequant_s(component, params)

    def _expert_compute_s(self, tokens: int) -> float:
        """One routed expert's FFN over `tokens` tokens."""
        if tokens <= 0:
            return 0.0
        if self._expert_table is not None:
            t = _interp_ms(self._expert_table, tokens) * 1e-3
            return t if self.runtime is None else t + self._dequant_s("experts", self.model.expert_params)
        return self._ffn(tokens, self.model.expert_params, self.model.matrices_per_expert, "experts")

    def _shared_compute_s(self, tokens: int) -> float:
        """All shared experts of one layer over `tokens` tokens."""
        m = self.model
        if m.num_shared_experts == 0 or tokens <= 0:
            return 0.0
        return m.num_shared_experts * self._ffn(tokens, m.shared_expert_params, m.matrices_per_expert, "dense")

    def _dense_ffn_s(self, tokens: int) -> float:
        m = self.model
        params = m.matrices_per_expert * m.hidden_size * (m.dense_intermediate_size or 0)
        return self._ffn(tokens, params, m.matrices_per_expert) if params else 0.0

    def attention_s(self, new_tokens: int, context_tokens: int, sequences: int = 1) -> float:
        """One attention block: QKV/O projections for `new_tokens`, plus reading/writing the KV
        cache of `context_tokens` positions in total (summed over the batch's sequences).

        FLOPs = 2·new·attn_params + 4·new·ctx_per_seq·heads·head_dim (QK^T and PV);
        bytes = weights + KV cache (2·ctx·kv_heads·head_dim·2 bytes, bf16).
        """
        if new_tokens <= 0:
            return 0.0
        m = self.model
        grid = self._rt.attention_grid
        seqs = max(sequences, 1)
        if grid is not None and (new_tokens <= seqs or self._attn_table is None):
            return grid.ms_at(seqs, context_tokens / seqs) * 1e-3 * (new_tokens / seqs if new_tokens > seqs else 1.0)
        if grid is not None:  # a prefill: the profile's table is one causal sequence of N tokens, per sequence
            t = seqs * _interp_ms(self._attn_table, new_tokens / seqs) * 1e-3
            return t + self._dequant_s("attention", m.attention_params)
        if self._attn_table is not None:
            t = _interp_ms(self._attn_table, new_tokens) * 1e-3
            return t if self.runtime is None else t + self._dequant_s("attention", m.attention_params)
        ctx_per_seq = context_tokens / max(sequences, 1)
        flops = 2.0 * new_tokens * m.attention_params + 4.0 * new_tokens * ctx_per_seq * m.num_heads * m.head_dim
        kv_bytes = 2.0 * context_tokens * m.num_kv_heads * m.head_dim * 2
        nbytes = m.attention_params * m.component_bytes_per_param("attention") + kv_bytes
        t = self._roofline(flops, nbytes, 4)
        if self.runtime is None:
            return t
        return t / self._rt.attention_efficiency + self._dequant_s("attention", m.attention_params)

    def lm_head_s(self, tokens: int) -> float:
        """The LM head: the runtime's `lm_head_ms` when given, else a roofline (bf16 unless
        model.precision says otherwise) at the runtime's achieved efficiency."""
        m = self.model
        if self._rt.lm_head_table is not None and tokens > 0:
            return _interp_ms(self._rt.lm_head_table, tokens) * 1e-3
        if self._rt.lm_head_ms is not None and tokens > 0:
            return self._rt.lm_head_ms * 1e-3
        if not m.vocab_size or tokens <= 0:
            return 0.0
        params = m.vocab_size * m.hidden_size
        bpp = 2 if m.precision is None else m.component_bytes_per_param("dense")
        t = self._roofline(2.0 * tokens * params, params * bpp, 1)
        return t if self.runtime is None else t / self._rt.lm_head_efficiency

    def pcie_s(self, nbytes: float) -> float:
        link = self.hw.pcie_h2d
        return transfer_s(nbytes, link.bandwidth_gbps, link.latency_us)

    def disk_s(self, nbytes: float) -> float:
        d = self.hw.disk
        return transfer_s(nbytes, d.read_bandwidth_gbps, d.latency_us)
