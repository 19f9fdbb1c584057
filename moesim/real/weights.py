"""The weights of a real run: the expert file on disk (every routed expert) and the blocks that
stay resident on the compute device (attention, shared experts, dense FFNs, LM head). Random
values of the model's shapes: only the timing matters, and it does not depend on the values."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from .kernels import Attention, Shapes, random_weight
from .store import drop_cache, write_random_file
from .torchutil import require_torch


def random_expert_bytes(shapes: Shapes, dtype, gen):
    """One expert's matrices (w1[, w3], w2) of random weights, flattened to uint8 on the CPU."""
    torch = require_torch()
    parts = [random_weight((shapes.I, shapes.H), dtype, "cpu", gen) for _ in range(shapes.mats - 1)]
    parts.append(random_weight((shapes.H, shapes.I), dtype, "cpu", gen))
    return torch.cat([p.reshape(-1) for p in parts]).view(torch.uint8)


def expert_file(workdir: Path, model, shapes: Shapes, dtype, seed: int) -> Path:
    """The file of every (layer, expert) at `key * slot_bytes` (reused when it is already there,
    with its pages dropped from the page cache); an InputError when the disk has no room."""
    n = model.num_layers * model.num_experts
    path = workdir / f"experts-{model.num_layers}x{model.num_experts}x{shapes.slot_bytes}-{shapes.dtype_name}.bin"
    if path.is_file() and path.stat().st_size == n * shapes.slot_bytes:
        drop_cache(path)
        return path
    gen = require_torch().Generator().manual_seed(seed)
    pool = [random_expert_bytes(shapes, dtype, gen).numpy() for _ in range(min(4, n))]
    need = n * shapes.slot_bytes
    free = shutil.disk_usage(workdir).free
    if need > free * 0.9:
        raise InputError(f"the expert file needs {need / 1e9:.2f} GB but {workdir} has "
                         f"{free / 1e9:.2f} GB free (use --scale, --layers or --workdir)", field="--workdir")
    write_random_file(path, n, shapes.slot_bytes, lambda i: pool[i % len(pool)])
    return path


class Resident:
    """What stays on the compute device: an attention block per layer (dense ones first), the shared
    experts of each MoE layer, the dense FFNs and the LM head (None without a vocabulary)."""

    def __init__(self, model, shapes: Shapes, dtype, device: str, seed: int):
        gen = require_torch().Generator().manual_seed(seed)
        s, dt, dev = shapes, dtype, device
        self.attn = [Attention(s, dt, dev, gen) for _ in range(model.first_dense_layers + model.num_layers)]

        def mlp(width):
            w1 = random_weight((width, s.H), dt, dev, gen)
            w3 = random_weight((width, s.H), dt, dev, gen) if s.gated else None
            return w1, w3, random_weight((s.H, width), dt, dev, gen)

        self.dense = [mlp(model.dense_intermediate_size) for _ in range(model.first_dense_layers)]
        sw = model.shared_expert_intermediate_size or model.expert_intermediate_size
        self.shared = [[mlp(sw) for _ in range(model.num_shared_experts)] for _ in range(model.num_layers)]
        self.lm_head = random_weight((model.vocab_size, s.H), dt, dev, gen) if model.vocab_size else None
