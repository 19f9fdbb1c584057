"""Collect routing traces from `transformers` MoE models (`moesim trace collect`).

torch and transformers are optional: they are imported inside the functions that need them.

How it works: a forward hook on every MoE block's router module records, per forward pass, the
router logits and the experts the router itself returned (so the trace holds exactly what the
model ran, quirks included); with `pre_attn` a second hook on each MoE block's input layernorm
records the pre-attention hidden state. Each prompt is one request: one prefill forward over the
prompt, then greedy decoding, one forward per generated token (batch size 1, KV cache on), so the
rows of one forward are the tokens it fed, in order. The model is put in eval mode: router jitter
(Mixtral, PhiMoE, Switch) and PhiMoE's sampled sparsemixer are training-only.

Experts are written in gate-score order: descending router logit, which for every supported family
is the order of the router's own ranking (softmax and sigmoid are monotone; DeepSeek's top-k is
taken with `sorted=False`, so its output order is arbitrary and is sorted here). The `scores` column
holds, in the same order, the gate weights the model multiplies the expert outputs by
(`scores="weights"`), or all router logits (`scores="logits"`).

Routers of transformers >= 5 return `(logits, weights, indices)` (Switch: `(one-hot dispatch,
top-1 prob, logits)`) and are read as such. Older releases whose gate is a plain `nn.Linear`
returning logits are handled by recomputing the family's selection rule from the logits
(`select_topk`), which the tests check against the >= 5 routers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ..traces.schema import TraceMeta
from .families import FAMILIES, Family, family_for, select_topk, supported_text
from .prompts import read_prompts

__all__ = ["FAMILIES", "Family", "collect_from_model", "collect_to_file", "family_for", "iter_collect", "read_prompts",
           "select_topk", "supported_text", "write_collected"]

#: transformers version the hooks were written and tested against
TESTED_TRANSFORMERS = "5.23.0"


# ---- hooks ----------------------------------------------------------------------------------------

@dataclass
class _Router:
    layer: int            # MoE layer index in the trace
    name: str             # module path
    module: object
    legacy: bool          # a plain Linear gate: logits only
    norm_name: str | None  # the block's input layernorm


_LAYER_RE = re.compile(r"^(?P<stack>.*?)(?P<kind>layers|block)\.(?P<idx>\d+)\.")


def find_routers(model, family: Family, stack: str | None = None) -> list[_Router]:
    """The MoE routers of `model` in block order (of one stack for encoder-decoder models)."""
    import torch

    mods = dict(model.named_modules())
    found: list[tuple[str, int, str, object, bool]] = []
    for name, mod in mods.items():
        cls = type(mod).__name__
        if cls in family.router_classes:
            found.append((name, mod, False))
        elif cls in family.block_classes:
            child_name = next((c for c in ("gate", "router") if isinstance(getattr(mod, c, None), torch.nn.Module)),
                              None)
            if child_name is None:
                continue
            child = getattr(mod, child_name)
            if type(child).__name__ in family.router_classes:
                continue  # found by class
            found.append((f"{name}.{child_name}", child, isinstance(child, torch.nn.Linear)))
    rows = []
    for name, mod, legacy in found:
        m = _LAYER_RE.match(name)
        if m is None:
            raise InputError(f"cannot tell the block of router module {name!r}", field="--model")
        prefix, kind, idx = m.group("stack"), m.group("kind"), int(m.group("idx"))
        st = "decoder" if "decoder" in prefix else "encoder" if "encoder" in prefix else None
        if stack is not None and st != stack:
            continue
        block = f"{prefix}{kind}.{idx}"
        norm = next((n for n in (f"{block}.input_layernorm", f"{block}.layer.0.layer_norm", f"{block}.ln_1")
                     if n in mods), None)
        rows.append((prefix, idx, name, mod, legacy, norm))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [_Router(i, name, mod, legacy, norm) for i, (_, _, name, mod, legacy, norm) in enumerate(rows)]


class _Recorder:
    """Forward hooks filling, for the forward pass under way, per MoE layer: logits, indices, weights
    (and the pre-attention hidden state)."""

    def __init__(self, model, family: Family, routers: list[_Router], top_k: int, pre_attn: bool):
        self.family, self.routers, self.top_k = family, routers, top_k
        self.config = getattr(model, "config", None)
        self.handles = []
        self.step: dict[int, tuple] = {}
        self.pre: dict[int, object] = {}
        self.dropped = 0
        mods = dict(model.named_modules())
        for r in routers:
            self.handles.append(r.module.register_forward_hook(self._router_hook(r)))
            if pre_attn:
                if r.norm_name is None:
                    raise InputError(f"--pre-attn: no input layernorm found for the block of {r.name}",
                                     field="--pre-attn")
                self.handles.append(mods[r.norm_name].register_forward_hook(self._norm_hook(r.layer)))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def reset(self):
        self.step, self.pre = {}, {}

    def _norm_hook(self, layer):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            self.pre[layer] = out.detach().reshape(-1, out.shape[-1]).to("cpu").float()
        return hook

    def _router_hook(self, r: _Router):
        import torch

        rule = self.family.rule

        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):                  # legacy Linear gate: logits
                logits = output
                idx, w = select_topk(rule, logits.reshape(-1, logits.shape[-1]), self.top_k, module, self.config)
            elif rule == "switch":                                # (one-hot dispatch, top-1 prob, logits)
                dispatch, _, logits = output
                probs = torch.softmax(logits.float(), dim=-1)
                w, idx = probs.reshape(-1, probs.shape[-1]).max(dim=-1, keepdim=True)
                self.dropped += int((dispatch.reshape(-1, dispatch.shape[-1]).sum(-1) == 0).sum())
            elif len(output) == 3:                                # (logits, weights, indices)
                logits, w, idx = output
            elif len(output) == 2 and not output[0].is_floating_point():   # (indices, weights), no logits
                idx, w = output
                h = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                logits = torch.nn.functional.linear(h, module.weight.float())
            else:
                raise InputError(f"router {type(module).__name__} returned {len(output)} values, expected "
                                 f"(logits, weights, indices) as in transformers {TESTED_TRANSFORMERS}",
                                 field="--model")
            E = logits.shape[-1]
            self.step[r.layer] = (logits.detach().reshape(-1, E).float().cpu(),
                                  idx.detach().reshape(-1, idx.shape[-1]).long().cpu(),
                                  w.detach().reshape(-1, w.shape[-1]).float().cpu())
        return hook

    def take(self, n_tokens: int, want_pre: bool):
        """The routing of the forward pass just run: arrays [n, L, ...] in gate-score order."""
        import torch

        L = len(self.routers)
        missing = [l for l in range(L) if l not in self.step]
        if missing:
            raise RuntimeError(f"MoE layers {missing} did not run in this forward pass")
        logits = torch.stack([self.step[l][0] for l in range(L)], dim=1)   # [n, L, E]
        idx = torch.stack([self.step[l][1] for l in range(L)], dim=1)      # [n, L, K]
        w = torch.stack([self.step[l][2] for l in range(L)], dim=1)
        if logits.shape[0] != n_tokens:
            raise RuntimeError(f"router saw {logits.shape[0]} rows, expected {n_tokens} tokens")
        # gate-score order: descending logit (stable: ties keep the router's order)
        sel = logits.gather(-1, idx)
        order = torch.sort(sel, dim=-1, descending=True, stable=True).indices
        idx, w = idx.gather(-1, order), w.gather(-1, order)
        pre = None
        if want_pre:
            pre = torch.stack([self.pre[l] for l in range(L)], dim=1).to(torch.float16).numpy()
        self.reset()
        return logits.numpy(), idx.numpy().astype(np.int16), w.numpy().astype(np.float32), pre


# ---- collection -----------------------------------------------------------------------------------

@dataclass
class CollectedRequest:
    """Routing of one prompt: prompt tokens first, then the decoded ones."""

    request_id: int
    prompt_len: int
    input_ids: list[int]                 # prompt + generated token ids (the tokens fed)
    experts: np.ndarray                  # [T, L, K] int16, gate-score order
    weights: np.ndarray                  # [T, L, K] float32, gate weights in the same order
    logits: np.ndarray                   # [T, L, E] float32
    pre_attn: np.ndarray | None = None   # [T, L, H] float16

    @property
    def tokens(self) -> int:
        return self.experts.shape[0]


@dataclass
class Collection:
    """What `iter_collect` found about the model before running it."""

    family: Family
    num_layers: int
    num_experts: int
    top_k: int
    routers: list[str] = field(default_factory=list)
    dropped_tokens: int = 0   # Switch: tokens over an expert's capacity (the model skipped their expert)


def _model_type(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _shape(model, family: Family, routers: list[_Router]) -> tuple[int, int]:
    """(num_experts, top_k) from the router modules (config as fallback)."""
    r = routers[0].module
    cfg = model.config
    E = getattr(r, "num_experts", None) or getattr(r, "out_features", None)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if E is None and getattr(cfg, key, None):
            E = getattr(cfg, key)
    if family.rule == "switch":
        K = 1
    else:
        K = getattr(r, "top_k", None) or getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "experts_per_token",
                                                                                              None)
    if not E or not K:
        raise InputError("cannot tell num_experts/top_k of this model", field="--model")
    return int(E), int(K)


def prepare(model, stack: str | None = None) -> tuple[Family, list[_Router], int, int]:
    family = family_for(_model_type(model))
    if family.encoder_decoder:
        stack = stack or "decoder"
        if stack not in ("encoder", "decoder"):
            raise InputError(f"expected 'encoder' or 'decoder', found {stack!r}", field="--stack")
    else:
        stack = None
    routers = find_routers(model, family, stack)
    if not routers:
        raise InputError(f"no {family.name} router modules found in {type(model).__name__} (classes "
                         f"{', '.join(family.router_classes)}); tested with transformers {TESTED_TRANSFORMERS}",
                         field="--model")
    E, K = _shape(model, family, routers)
    return family, routers, E, K


def iter_collect(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pre_attn: bool = False,
                 stack: str | None = None, stop_at_eos: bool = False, info: Collection | None = None,
                 progress=None) -> Iterator[CollectedRequest]:
    """Run each prompt (a list of token ids) through `model`: prefill, then greedy decoding of
    `max_new_tokens` tokens, each fed back through the model. Yields one CollectedRequest per prompt.

    Encoder-decoder models (Switch): `stack="decoder"` (default) records the decoder's MoE layers (its
    prefill is the decoder start token); `stack="encoder"` records the encoder's over the prompt, with
    no decode.
    """
    import torch

    family, routers, E, K = prepare(model, stack)
    if family.encoder_decoder:
        stack = stack or "decoder"
    if info is not None:
        info.family, info.num_layers, info.num_experts, info.top_k = family, len(routers), E, K
        info.routers = [r.name for r in routers]
    was_training = model.training
    model.eval()
    rec = _Recorder(model, family, routers, K, pre_attn)
    device = next(model.parameters()).device
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    try:
        with torch.inference_mode():
            for rid, prompt in enumerate(prompts):
                prompt = [int(t) for t in prompt]
                if not prompt:
                    raise InputError(f"prompt {rid} is empty", field="--prompts")
                parts, fed = [], list(prompt)
                ids = torch.tensor([prompt], device=device)
                rec.reset()
                if family.encoder_decoder:
                    enc = model.get_encoder()(input_ids=ids)
                    if stack == "encoder":
                        parts.append(rec.take(len(prompt), pre_attn))
                        fed_prompt = len(prompt)
                        out = None
                    else:
                        start = getattr(model.generation_config, "decoder_start_token_id", None)
                        if start is None:
                            start = getattr(model.config, "decoder_start_token_id", None) or 0
                        fed = [int(start)]
                        rec.reset()
                        dec = torch.tensor([[int(start)]], device=device)
                        out = model(encoder_outputs=enc, decoder_input_ids=dec, use_cache=True)
                        parts.append(rec.take(1, pre_attn))
                        fed_prompt = 1
                else:
                    out = model(input_ids=ids, use_cache=True)
                    parts.append(rec.take(len(prompt), pre_attn))
                    fed_prompt = len(prompt)
                if out is not None:
                    for _ in range(max_new_tokens):
                        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                        tok = int(nxt[0, 0])
                        if stop_at_eos and tok in eos:
                            break
                        kw = dict(past_key_values=out.past_key_values, use_cache=True)
                        if family.encoder_decoder:
                            out = model(encoder_outputs=enc, decoder_input_ids=nxt, **kw)
                        else:
                            out = model(input_ids=nxt, **kw)
                        parts.append(rec.take(1, pre_attn))
                        fed.append(tok)
                logits = np.concatenate([p[0] for p in parts])
                experts = np.concatenate([p[1] for p in parts])
                weights = np.concatenate([p[2] for p in parts])
                pre = np.concatenate([p[3] for p in parts]) if pre_attn else None
                if progress is not None:
                    progress(rid, len(prompts))
                yield CollectedRequest(rid, fed_prompt, fed, experts, weights, logits, pre)
    finally:
        rec.close()
        if info is not None:
            info.dropped_tokens = rec.dropped
        model.train(was_training)


def collect_from_model(model, prompts, max_new_tokens: int, **kw) -> tuple[list[CollectedRequest], Collection]:
    info = Collection(family=None, num_layers=0, num_experts=0, top_k=0)  # type: ignore[arg-type]
    reqs = list(iter_collect(model, prompts, max_new_tokens, info=info, **kw))
    return reqs, info


def request_table(r: CollectedRequest, scores: str = "weights", pre_attn: bool = False) -> pa.Table:
    """The rows of one collected request (DESIGN §2 schema)."""
    T, L, K = r.experts.shape
    tok = np.repeat(np.arange(T, dtype=np.int32), L)
    cols = {
        "request_id": pa.array(np.full(T * L, r.request_id, dtype=np.int32)),
        "token": pa.array(tok),
        "phase": pa.DictionaryArray.from_arrays(pa.array((tok >= r.prompt_len).astype(np.int8)),
                                                pa.array(["prefill", "decode"])),
        "layer": pa.array(np.tile(np.arange(L, dtype=np.int16), T)),
        "experts": _fixed_lists(r.experts.reshape(T * L, K), pa.int16()),
    }
    if scores == "weights":
        cols["scores"] = _fixed_lists(r.weights.reshape(T * L, K), pa.float32())
    elif scores == "logits":
        cols["scores"] = _fixed_lists(r.logits.reshape(T * L, -1), pa.float32())
    elif scores != "none":
        raise InputError(f"expected weights, logits or none, found {scores!r}", field="--scores")
    if pre_attn:
        if r.pre_attn is None:
            raise ValueError("pre_attn was not collected")
        cols["pre_attn"] = _fixed_lists(r.pre_attn.reshape(T * L, -1), pa.float16())
    return pa.table(cols)


def _fixed_lists(a: np.ndarray, typ) -> pa.ListArray:
    n, w = a.shape
    offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(a).reshape(-1), type=typ))


def write_collected(path, requests: Iterable[CollectedRequest], meta: TraceMeta, scores: str = "weights",
                    pre_attn: bool = False, **kw) -> Path:
    from ..traces.io import write_trace

    return write_trace(path, (request_table(r, scores, pre_attn) for r in requests), meta, **kw)


# ---- the CLI's pieces ------------------------------------------------------------------------------

def load_model(model_id: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """Load a supported model (local path or hub id); InputError when it cannot be."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    except ImportError as e:
        raise InputError(f"needs torch and transformers (pip install 'moesim[collect]'): {e}", field="--model") \
            from None
    try:
        cfg = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise InputError(f"cannot load the model config: {_first_line(e)}", field="--model") from None
    family = family_for(getattr(cfg, "model_type", None), file=model_id)
    cls = AutoModelForSeq2SeqLM if family.encoder_decoder else AutoModelForCausalLM
    dt = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise InputError(f"expected auto, float32, bfloat16 or float16, found {dtype!r}", field="--dtype")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(dtype=dt, trust_remote_code=trust_remote_code)
    try:
        if device == "cuda":
            try:
                model = cls.from_pretrained(model_id, device_map="auto", **kw)
            except (ImportError, ValueError):   # no accelerate: one device
                model = cls.from_pretrained(model_id, **kw).to(device)
        else:
            model = cls.from_pretrained(model_id, **kw).to(device)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load the model: {_first_line(e)}", field="--model") from None
    return model


def load_tokenizer(model_id: str, trust_remote_code: bool = False):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"text prompts need the model's tokenizer, which cannot be loaded ({_first_line(e)}); "
                         f"give token ids instead (JSONL lines with 'input_ids')", field="--prompts") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


def model_label(model_id: str) -> str:
    p = Path(model_id)
    return p.name if p.exists() else model_id.rstrip("/")


def collect_to_file(model_id: str, prompts_file, output, max_new_tokens: int, *, pre_attn: bool = False,
                    scores: str = "weights", stack: str | None = None, device: str = "auto", dtype: str = "auto",
                    max_prompt_tokens: int | None = None, num_prompts: int | None = None,
                    stop_at_eos: bool = False, trust_remote_code: bool = False, name: str | None = None,
                    progress=None) -> tuple[Path, Collection]:
    """`moesim trace collect`: load, tokenise, run, write."""
    if max_new_tokens < 0:
        raise InputError(f"must be >= 0 (got {max_new_tokens})", field="--max-new-tokens")
    if scores not in ("weights", "logits", "none"):
        raise InputError(f"expected weights, logits or none, found {scores!r}", field="--scores")
    raw = read_prompts(prompts_file)
    if num_prompts is not None:
        raw = raw[:num_prompts]
    model = load_model(model_id, device, dtype, trust_remote_code)
    tok = None
    prompts: list[list[int]] = []
    for p in raw:
        if isinstance(p, str):
            tok = tok or load_tokenizer(model_id, trust_remote_code)
            p = tok(p)["input_ids"]
        if max_prompt_tokens:
            p = p[:max_prompt_tokens]
        prompts.append(list(p))
    vocab = getattr(model.config, "vocab_size", None)
    for i, p in enumerate(prompts):
        bad = [t for t in p if vocab is not None and t >= vocab]
        if bad:
            raise InputError(f"prompt {i}: token id {bad[0]} >= vocab_size {vocab}", file=str(prompts_file))
    family, routers, E, K = prepare(model, stack)
    label = name or model_label(model_id)
    if family.encoder_decoder:
        label = f"{label}:{stack or 'decoder'}"
    meta = TraceMeta(model=label, num_layers=len(routers), num_experts=E, top_k=K,
                     source=f"collected:{model_id}@{Path(prompts_file).name}", seed=None)
    info = Collection(family=family, num_layers=len(routers), num_experts=E, top_k=K)
    reqs = iter_collect(model, prompts, max_new_tokens, pre_attn=pre_attn, stack=stack, stop_at_eos=stop_at_eos,
                        info=info, progress=progress)
    path = write_collected(output, reqs, meta, scores=scores, pre_attn=pre_attn)
    return path, info
