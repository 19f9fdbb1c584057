"""Does the first attention call at a new context length cost more than the next ones? A diagnostic
for the GPU rows (the replay's decode attention grows its context by one every step, and layer 0 of
each batch-8 step took ~49 ms against ~0.7 ms for layers 1-3).

    python benchmarks/gpu/sdpa_shapes.py   # on a CUDA machine

Times `scaled_dot_product_attention` with a boolean mask (as moesim.real.kernels calls it), batch 1
and 8, one query, 16 heads x 128, context 40..71: the first call at each length and the second,
with torch's default backends and with the cuDNN backend disabled."""
from __future__ import annotations

import time

import torch

F = torch.nn.functional


def run(B: int, label: str) -> None:
    dev, dt = "cuda", torch.bfloat16
    first, second = [], []
    w = torch.randn(B, 16, 8, 128, device=dev, dtype=dt)  # warm-up at another length
    F.scaled_dot_product_attention(w[:, :, :1], w, w, attn_mask=torch.ones(B, 1, 1, 8, dtype=torch.bool, device=dev))
    for ctx in range(40, 72):
        q = torch.randn(B, 16, 1, 128, device=dev, dtype=dt)
        k = torch.randn(B, 16, ctx, 128, device=dev, dtype=dt)
        v = torch.randn_like(k)
        mask = (torch.arange(ctx, device=dev)[None, None, None, :] < ctx)
        mask = mask.expand(B, 1, 1, ctx)
        for out in (first, second):
            torch.cuda.synchronize()
            t = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t) * 1e3)
    med = lambda x: sorted(x)[len(x) // 2]  # noqa: E731
    print(f"{label:28s} B={B}: first call at a new length median {med(first):7.3f} ms (max {max(first):7.3f}), "
          f"second {med(second):6.3f} ms")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0))
    for B in (1, 8):
        run(B, "default backends")
    torch.backends.cuda.enable_cudnn_sdp(False)
    for B in (1, 8):
        run(B, "cuDNN SDPA disabled")
