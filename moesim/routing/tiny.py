"""`moesim trace train-tiny`: learn an MoE routing here, with no download.

A small OLMoE-architecture language model (transformers' `OlmoeConfig`: 4 layers, 32 experts,
top-2, hidden 128, byte-level vocabulary of 256 so no tokenizer is needed) is trained from a
fixed seed for a fixed number of steps on the CPU over the Python standard library's own source
files (the top-level `*.py` modules of `sysconfig.get_paths()["stdlib"]`), then its routing is
collected (`moesim.routing.collect`) on files held out from training: greedy decoding from a
prompt cut out of each held-out file, with the pre-attention hidden state.

`--requests` beyond the 16 held-out top-level modules continues with one prompt per file of the
standard library's sub-packages (``email/``, ``asyncio/``, ...; training reads top-level modules only,
so these are held out too), the first 16 prompts unchanged.

The split is by file name (crc32(name) % 10 == 0 is held out), so it does not depend on which other
files a Python version ships; the corpus itself does (the trace metadata names the Python
version). Training is bounded by steps, not time, so the same seed, Python and torch give the
same model; `--max-minutes` is a safety cap that, if hit, makes the run not reproducible (the
metadata says how many steps were done).

Regenerate the shipped sample:  python -m moesim.traces.tiny -o traces/tiny-learned.parquet
(see traces/make_tiny_learned.sh).
"""
from __future__ import annotations

import math
import os
import platform
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

MODEL_NAME = "tiny-olmoe-stdlib"


@dataclass
class TinyRecipe:
    seed: int = 0
    layers: int = 4
    experts: int = 32
    top_k: int = 2
    hidden: int = 128
    expert_intermediate: int = 128
    heads: int = 4
    seq_len: int = 128
    batch: int = 16
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    threads: int = 1
    # collection on held-out files
    requests: int = 40
    prompt_len: int = 64
    decode_len: int = 64
    heldout_eval_windows: int = 64


@dataclass
class TinyResult:
    recipe: TinyRecipe
    python: str
    torch: str
    transformers: str
    train_files: int
    heldout_files: int
    train_bytes: int
    params: int
    active_params: int
    steps_done: int
    train_seconds: float
    collect_seconds: float
    loss_curve: list = field(default_factory=list)   # (step, train CE nats/byte, aux loss)
    heldout_ce: float | None = None                  # nats per byte
    output: str | None = None
    trace_bytes: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) top-level stdlib modules, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)
    if not files:
        raise InputError("no *.py files in the standard library directory", file=str(root))
    held = [p for p in files if zlib.crc32(p.name.encode()) % 10 == 0]
    train = [p for p in files if zlib.crc32(p.name.encode()) % 10 != 0]
    if not held or not train:
        raise InputError("the standard library split left no held-out or no training files", file=str(root))
    return train, held


def _bytes(p: Path) -> bytes:
    return p.read_bytes().replace(b"\r\n", b"\n")


def build_model(r: TinyRecipe):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        vocab_size=256, hidden_size=r.hidden, intermediate_size=r.expert_intermediate,
        num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.heads,
        num_experts=r.experts, num_experts_per_tok=r.top_k, norm_topk_prob=False,
        max_position_embeddings=max(512, r.seq_len, r.prompt_len + r.decode_len + 1),
        router_aux_loss_coef=r.aux_loss_coef, output_router_logits=True,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )
    return OlmoeForCausalLM(cfg)


def _lr(step: int, r: TinyRecipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    frac = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


#: stdlib sub-directories whose files are never prompts: not the standard library's own code
#: (site-packages), tests, generated codec tables, platform build files, frozen-module samples
EXTRA_SKIP = ("site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__",
              "__phello__")
EXTRA_MIN_BYTES = 1024


def extra_heldout_files() -> list[Path]:
    """Standard-library files in sub-packages (``email/utils.py``, ...): never trained on (training reads
    top-level modules only), so also held out. Skipped: `EXTRA_SKIP` directories, ``config-*``,
    ``test*.py`` and files under `EXTRA_MIN_BYTES` (mostly ``__init__`` stubs). Ordered by crc32 of the
    relative path (a fixed shuffle, so the first few come from many packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXTRA_SKIP and not d.startswith("config-")]   # prune
        if Path(top) == root:
            continue
        for n in names:
            p = Path(top) / n
            if n.endswith(".py") and not n.startswith("test") and p.is_file() and p.stat().st_size >= EXTRA_MIN_BYTES:
                rel = p.relative_to(root).as_posix()
                out.append((zlib.crc32(rel.encode()), rel, p))
    return [p for _, _, p in sorted(out)]


def held_out_prompts(held: list[Path], r: TinyRecipe) -> tuple[list[list[int]], list[str]]:
    """One prompt per held-out file (the first `requests` files by name), starting at a seeded random
    line start, `prompt_len` bytes long. More `requests` than held-out top-level files: then one prompt
    per file of `extra_heldout_files()` (named by their path under the stdlib), drawn from the same
    generator after the top-level ones, so the first prompts do not depend on `requests`."""
    rng = np.random.default_rng(r.seed + 1)
    prompts, names = [], []
    root = Path(sysconfig.get_paths()["stdlib"])

    def files():
        yield from held
        if len(prompts) < r.requests:
            yield from extra_heldout_files()

    for p in files():
        data = _bytes(p)
        if len(data) < r.prompt_len + 2:
            continue
        off = int(rng.integers(0, len(data) - r.prompt_len))
        nl = data.rfind(b"\n", 0, off)
        off = nl + 1 if nl >= 0 else 0
        prompts.append(list(data[off: off + r.prompt_len]))
        names.append(p.name if p.parent == root else p.relative_to(root).as_posix())
        if len(prompts) == r.requests:
            break
    return prompts, names


def _files(names: list[str]) -> str:
    """'16 files', or '16 files + 24 sub-package files'."""
    sub = sum("/" in n for n in names)
    return f"{len(names) - sub} files" + (f" + {sub} sub-package files" if sub else "")


def _check_recipe(r: TinyRecipe) -> None:
    for name in ("steps", "layers", "experts", "top_k", "hidden", "batch", "seq_len", "requests", "prompt_len"):
        if getattr(r, name) <= 0:
            raise InputError(f"must be > 0 (got {getattr(r, name)})", field=f"--{name.replace('_', '-')}")
    if r.top_k > r.experts:
        raise InputError(f"top_k ({r.top_k}) exceeds experts ({r.experts})", field="--top-k")
    if r.hidden % r.heads:
        raise InputError(f"hidden ({r.hidden}) must be a multiple of heads ({r.heads})", field="--hidden")


def _byte_tensor(files: list[Path]):
    import torch

    corpus = b"\n\n".join(_bytes(p) for p in files)
    return corpus, torch.from_numpy(np.frombuffer(corpus, dtype=np.uint8).astype(np.int64))


def _optimizer(model, r: TinyRecipe):
    """AdamW, weight decay on matrices other than norms only."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95))


def _train(model, data, r: TinyRecipe, max_minutes: float | None, log) -> tuple[list, int, float]:
    """Next-byte training on random windows of `data`: (loss curve, steps done, seconds)."""
    import torch

    gen = torch.Generator().manual_seed(r.seed)
    opt = _optimizer(model, r)
    model.train()
    curve = []
    acc_ce = acc_aux = 0.0
    acc_n = 0
    t0 = time.perf_counter()
    steps_done = 0
    span = len(data) - r.seq_len - 1
    for step in range(r.steps):
        starts = torch.randint(0, span, (r.batch,), generator=gen)
        x = torch.stack([data[s: s + r.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = _lr(step, r)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss.item() if out.aux_loss is not None else 0.0
        acc_ce += out.loss.item() - r.aux_loss_coef * aux
        acc_aux += aux
        acc_n += 1
        steps_done = step + 1
        if steps_done % 50 == 0 or steps_done == r.steps:
            curve.append((steps_done, round(acc_ce / acc_n, 4), round(acc_aux / acc_n, 4)))
            log(f"  step {steps_done:5d}  train CE {acc_ce / acc_n:.3f} nats/byte ({acc_ce / acc_n / math.log(2):.3f} "
                f"bits)  aux {acc_aux / acc_n:.3f}  {time.perf_counter() - t0:6.1f}s")
            acc_ce = acc_aux = 0.0
            acc_n = 0
        if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
            log(f"  stopped at step {steps_done} by --max-minutes (this run is not reproducible)")
            break
    return curve, steps_done, time.perf_counter() - t0


def _heldout_ce(model, held: list[Path], r: TinyRecipe) -> float:
    """Mean cross-entropy (nats/byte) on seeded windows of the held-out files."""
    import torch

    model.eval()
    _, hd = _byte_tensor(held)
    hgen = torch.Generator().manual_seed(r.seed + 2)
    ce = []
    with torch.inference_mode():
        for _ in range(max(1, r.heldout_eval_windows // r.batch)):
            starts = torch.randint(0, len(hd) - r.seq_len - 1, (r.batch,), generator=hgen)
            x = torch.stack([hd[s: s + r.seq_len] for s in starts.tolist()])
            o = model(input_ids=x, labels=x, output_router_logits=False)
            ce.append(float(o.loss))
    return float(np.mean(ce))


def _collect(model, held: list[Path], r: TinyRecipe, steps_done: int, output, log) -> tuple:
    """Routing of the held-out prompts, written as a trace: (path, seconds)."""
    import torch

    from ..traces.schema import TraceMeta
    from .collect import iter_collect, write_collected

    t1 = time.perf_counter()
    prompts, names = held_out_prompts(held, r)
    if not prompts:
        raise InputError("no held-out file is long enough for a prompt", field="--prompt-len")
    pyv = platform.python_version()
    meta = TraceMeta(model=MODEL_NAME, num_layers=r.layers, num_experts=r.experts, top_k=r.top_k,
                     source=(f"collected:{MODEL_NAME}(train-tiny seed={r.seed} steps={steps_done} python={pyv} "
                             f"torch={torch.__version__})@stdlib-heldout({_files(names)}, prompt {r.prompt_len} "
                             f"+ decode {r.decode_len} bytes)"),
                     seed=r.seed)
    reqs = iter_collect(model, prompts, r.decode_len, pre_attn=True)
    path = write_collected(output, reqs, meta, scores="weights", pre_attn=True)
    col_s = time.perf_counter() - t1
    log(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB): {len(prompts)} requests from "
        f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    return path, col_s


def train_tiny(output, recipe: TinyRecipe | None = None, *, max_minutes: float | None = None,
               save_model: str | None = None, log=print) -> TinyResult:
    """Train the tiny OLMoE-style byte model on the stdlib's training files, then collect its routing on the
    held-out files into `output` (module docstring)."""
    import torch
    import transformers

    r = recipe or TinyRecipe()
    _check_recipe(r)
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    train, held = stdlib_files()
    corpus, data = _byte_tensor(train)
    model = build_model(r)
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * r.top_k // r.experts
    log(f"train-tiny: {len(train)} training files ({len(corpus) / 1e6:.2f} MB), {len(held)} held out; "
        f"{n_params / 1e6:.2f}M params ({active / 1e6:.2f}M active); {r.steps} steps of {r.batch}x{r.seq_len} bytes "
        f"on {r.threads} threads")
    curve, steps_done, train_s = _train(model, data, r, max_minutes, log)
    heldout = _heldout_ce(model, held, r)
    log(f"held-out CE {heldout:.3f} nats/byte ({heldout / math.log(2):.3f} bits/byte)")
    if save_model:
        model.save_pretrained(save_model)
        log(f"saved the model to {save_model}")
    path, col_s = _collect(model, held, r, steps_done, output, log)
    return TinyResult(recipe=r, python=platform.python_version(), torch=torch.__version__,
                      transformers=transformers.__version__, train_files=len(train), heldout_files=len(held),
                      train_bytes=len(corpus), params=n_params, active_params=active, steps_done=steps_done,
                      train_seconds=round(train_s, 1), collect_seconds=round(col_s, 1), loss_curve=curve,
                      heldout_ce=round(heldout, 4), output=str(path), trace_bytes=Path(path).stat().st_size)
