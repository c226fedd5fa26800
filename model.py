"""
FishAI GPT: one LLaMA-3-style decoder in one file.

RoPE (one shared cos/sin table), SwiGLU MLP, pre-norm RMSNorm, grouped-query attention
through torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA),
tied input/output embedding, no biases, a pre-allocated KV cache for decoding. The weight
layout equals transformers.LlamaForCausalLM (tie_word_embeddings=True), so conversion in
both directions is a renaming of tensors.

Also here: the presets, checkpoint I/O (atomic, weights_only-loadable), the one loader that
every script uses (`load_model`: .pt checkpoint, quantized .bin, HF Llama directory), the
quantized .bin format and the plain int8/int4/fp16 modules a .bin runs on (quantize.py, the
command, decides what to quantize and writes the files), HF conversion, the optimizer parameter
groups and the FLOPs/MFU helpers.

Usage:
    python model.py                          # table of presets: true parameter counts and sizes
    python model.py --config small           # one preset, with a per-tensor breakdown
    python model.py --json sizes.json        # the same table as JSON
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import itertools
import json
import math
import pickle
import struct
import sys
import zipfile
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import common
from common import (QUANT_MAGIC, CheckpointError, atomic_dir, atomic_write, atomic_write_text, check_model_path,
                    describe, file_kind, resolve_device, resolve_dtype)
from data_utils import TextTokenizer

PRESET_NAMES = ("tiny", "small", "medium", "large")  # CONFIGS below; named here for the torch-free parser


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(description="FishAI GPT presets: true parameter counts and sizes.")
    p.add_argument("--config", choices=PRESET_NAMES, help="show one preset with its tensors (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    common.add_overwrite_flag(p, "an existing --json file")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer before torch is imported (3 s here)
    common.quiet_interrupts()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402


IGNORE_INDEX = -1  # target id ignored by the loss (padding)
CHECKPOINT_FORMAT = "fishai-checkpoint"
CHECKPOINT_VERSION = 1


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 1408
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


CONFIGS = {
    # a CPU config: trains at thousands of tokens/s on 2 cores (vocab comes from the tokenizer)
    "tiny": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=704,
                        max_seq_len=256),
    # the seed's FishAI-Small (~34M with tied embeddings)
    "small": ModelConfig(vocab_size=32000, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=1408,
                         max_seq_len=1024),
    "medium": ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, d_ff=2816,
                          max_seq_len=2048),
    "large": ModelConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=8, d_ff=5632,
                         max_seq_len=2048),
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown config '{name}': choose one of {', '.join(CONFIGS)}")
    d = CONFIGS[name].to_dict()
    d.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(d)


def count_params(config: ModelConfig) -> int:
    """Parameter count from the config alone (tied embedding counted once)."""
    d, hd = config.d_model, config.head_dim
    attn = d * config.n_heads * hd * 2 + d * config.n_kv_heads * hd * 2
    mlp = 3 * d * config.d_ff
    return config.vocab_size * d + config.n_layers * (attn + mlp + 2 * d) + d


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # one fused kernel (it accumulates in fp32 for half-precision inputs, as LlamaRMSNorm does);
        # under autocast the residual stream that reaches it is fp32
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def rope_tables(config: ModelConfig, length: int):
    """cos/sin of shape (length, head_dim/2), fp32. HF layout: rotate the two halves."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x (B, H, T, hd); cos/sin broadcastable to (B, H, T, hd/2)
    x1, x2 = x.chunk(2, dim=-1)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache(nn.Module):
    """Pre-allocated per-layer key/value buffers, (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v, start=None, rows=None):
        """Write k/v at input_pos. `start` (a Python int, eager decoding) means the positions are
        start..start+T-1, and a slice assignment is cheaper than index_put. `rows` (a slice of the
        batch dim, continuous batching): input_pos is (B, T), each row at its own positions."""
        b = k.shape[0]
        if k.dtype != self.k.dtype:
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if rows is not None:
            kc, vc = self.k[rows], self.v[rows]  # views: the writes below land in the cache
            r = torch.arange(b, device=k.device)[:, None]
            kc[r, :, input_pos] = k.transpose(1, 2)
            vc[r, :, input_pos] = v.transpose(1, 2)
            return kc, vc
        if start is not None:
            self.k[:b, :, start:start + k.shape[2]] = k
            self.v[:b, :, start:start + k.shape[2]] = v
        else:
            self.k[:b, :, input_pos] = k
            self.v[:b, :, input_pos] = v
        return self.k[:b], self.v[:b]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d = config.d_model
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, is_causal, input_pos, kv_end, rows=None):
        B, T, _ = x.shape
        # module calls (not F.linear on the weights) so that hooks and swapped-in layers (GPTQ
        # calibration, LoRA) see every matmul
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if rows is not None:  # continuous batching: each row at its own positions (mask per row)
                k, v = self.kv_cache.update(input_pos, k, v, rows=rows)
            elif kv_end is not None:  # eager decoding
                k, v = self.kv_cache.update(input_pos, k, v, start=kv_end - T)
            else:
                k, v = self.kv_cache.update(input_pos, k, v)
            if kv_end is not None:  # attend only to the filled part of the cache (set with rows too)
                k, v = k[:, :, :kv_end], v[:, :, :kv_end]
            if q.dtype != k.dtype:
                q = q.to(k.dtype)
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None:
            # the fused kernels take GQA or an explicit mask, not both: expand K/V then
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(y if y.dtype == x.dtype else y.to(x.dtype))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, input_pos, kv_end, rows=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, input_pos, kv_end, rows)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# The model


def _ce_sum(h, weight, targets):
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def positions_from_doc_ids(doc_ids):
    """Position of every token inside its own (contiguous) document: restarts at 0 per document."""
    B, T = doc_ids.shape
    ar = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values
    return ar - first


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from (B, V) logits. temperature <= 0 is greedy."""
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def fit_prompt(ids, max_new_tokens: int, max_seq_len: int, min_prompt: int = 1) -> tuple[list, int]:
    """Make prompt + generation fit the context window: the one prompt-fitting rule of the project.
    max_new_tokens is first capped so that min(len(ids), min_prompt) prompt tokens fit beside it;
    then the prompt keeps its newest max_seq_len - max_new_tokens tokens. With min_prompt=1 this is
    lm-evaluation-harness's rule (context[-(max_length - max_gen_toks):]); generate.py passes half
    the window so a long reply does not push the whole prompt out. Returns (ids, max_new_tokens)."""
    ids = list(ids)
    max_new = max(0, min(int(max_new_tokens), max_seq_len - min(len(ids), max(1, min_prompt))))
    return ids[-(max_seq_len - max_new):], max_new


def cut_at_stop(text: str, stops) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops or ():
        i = text.find(s) if s else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic garbage collector off, then back as it was. A decode step makes hundreds of
    short-lived tensors and no reference cycles, and the collections they trigger cost ~10% of a
    batch-1 step (measured: small, int4, CPU). generate_stream decodes inside this (the collector
    is back when the stream ends or is closed)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class StaticDecodeStep:
    """A decode step with its own input buffers (tokens, position): every call copies into them, so
    a compiled step always sees the same tensors (no guard failure, no recompile). With
    cuda_graph=True the step is captured once as a CUDA graph and replayed: its kernels then cost
    one launch, and its output buffer holds the logits until the next replay. (gpt-fast gets the
    same from torch.compile's "reduce-overhead" mode; a graph of our own keeps the buffers and
    their lifetime explicit.)"""

    def __init__(self, fn, tok: torch.Tensor, pos: torch.Tensor, cuda_graph: bool = False, warmup: int = 3):
        self.fn, self.tok, self.pos, self.graph = fn, tok, pos, None
        if not cuda_graph:
            fn(tok, pos)  # compiles now, so that a failure shows here
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, autotuning, lazy inits) off the capture
            for _ in range(warmup):
                fn(tok, pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(tok, pos)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        if self.graph is None:
            return self.fn(self.tok, self.pos)
        self.graph.replay()
        return self.out


def fast_decode_default(device) -> bool:
    """Whether scripts decode through compile_decode's compiled CUDA-graph step by default: on CUDA
    (launch-bound otherwise), not on a CPU (compiling takes longer than the decoding it saves)."""
    return torch.device(device).type == "cuda"


class GPT(nn.Module):
    # loss is computed in chunks (recomputed in backward) once B*T*V exceeds this many logits,
    # so a big batch never holds the full fp32 logits tensor
    loss_chunk_elems = 2**27

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # built under `with torch.device("meta")` (install_runtime_layers) there is nothing to
        # initialize, and nn.Embedding's own init of a meta tensor would import torch._dynamo (seconds)
        meta = torch.empty(0).is_meta
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model,
                                    _weight=torch.empty(config.vocab_size, config.d_model) if meta else None)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # the output layer is tied to tok_emb (F.linear on its weight); a quantized model loaded
        # from a .bin sets its own module here (install_runtime_layers)
        self.lm_head = None
        with torch.device("cpu") if meta else contextlib.nullcontext():  # (arange on meta: the same import)
            cos, sin = rope_tables(config, config.max_seq_len)
        # one table shared by all layers; not saved (derived from the config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.tokenizer = None
        self.stage = None  # the training stage train.py recorded ("pretrain" / "sft"); exports carry it
        self.quantized_from = None  # loaded from a quantized .bin: its strategy (quantize.py warns on re-export)
        # generate() builds (once per batch size) and uses compile_decode's compiled CUDA-graph step:
        # generate.py, evaluate.py and benchmark.py turn this on for CUDA (fast_decode_default)
        self.fast_decode = False
        self.decode_path = "eager"
        self._cache_static = False
        self._cache_len = 0
        self._cache_batch = 0
        self._decode_fn = None  # set by compile_decode()
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        # residual projections are scaled down so the residual stream's variance does not grow
        # with depth (GPT-2 / nanoGPT): std / sqrt(2 * n_layers)
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.is_meta:  # no values to fill (install_runtime_layers builds on the meta device)
                continue
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- KV cache -----------------------------------------------------------------

    def setup_cache(self, batch_size, max_seq_len=None, dtype=None, device=None, static=False):
        """Allocate per-layer KV buffers. static=True keeps every decode step the same shape
        (attention over the whole buffer with a mask) for torch.compile / CUDA graphs."""
        length = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        # the norms are float in the model dtype even when tok_emb holds int8/int4 codes
        dtype = dtype or self.norm.weight.dtype
        device = device or self.norm.weight.device
        c = self.config
        with torch.inference_mode(False):  # plain tensors even when called inside generate(): the same
            for layer in self.layers:      # kind of buffer every time, so a compiled step is not re-traced
                layer.attn.kv_cache = KVCache(batch_size, c.n_kv_heads, length, c.head_dim, dtype, device)
        self._cache_static = static
        self._cache_len = length
        self._cache_batch = batch_size
        self._decode_fn = None  # a compiled step belongs to the buffers it was made for
        if static:
            with torch.inference_mode(False):
                mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            self.register_buffer("causal_mask", mask, persistent=False)

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.kv_cache = None
        self._cache_len = 0
        self._cache_batch = 0
        self._cache_static = False  # the next generate() sets up the (faster eager) dynamic cache
        self._decode_fn = None
        self.decode_path = "eager"
        if hasattr(self, "causal_mask"):
            del self.causal_mask

    def compile_decode(self, batch_size, max_seq_len=None, use_compile=True, cuda_graph=None, dtype=None):
        """Static KV cache + a single-token decode step of fixed shapes (the gpt-fast recipe), used
        by generate()/generate_stream() from then on (until clear_cache). The step is
        torch.compile'd (use_compile) and, on CUDA (cuda_graph=None means "on CUDA"), captured once
        as a CUDA graph and replayed, so a token costs one graph launch instead of ~100 kernel
        launches. Where a stage fails (no compiler, an op that cannot be captured) the next one
        runs: compiled + graph, eager + graph, compiled, eager; self.decode_path names what runs
        and why. dtype: the KV cache's (default: the model's; generate passes its autocast dtype)."""
        device = self.norm.weight.device
        if dtype is None and torch.is_autocast_enabled(device.type):  # the cache holds what autocast computes
            dtype = torch.get_autocast_dtype(device.type)
        if use_compile:
            # dynamo keeps one cache of traces for _last_logits' code, shared by every model and batch
            # size: past its recompile limit it would silently run eagerly, and a trace made for another
            # model's buffers was seen to be reused for this one's (index_copy_ of bf16 into fp32)
            torch._dynamo.reset()
        self.setup_cache(batch_size, max_seq_len, dtype=dtype, static=True)
        self._decode_settings = (use_compile, cuda_graph)
        graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        plans = [(c, g) for c in ((True, False) if use_compile else (False,)) for g in ((True, False) if graph else (False,))]
        plans.sort(key=lambda cg: (not cg[1], not cg[0]))  # a graph first (it removes the launches), then compiled
        why = []
        for compiled, captured in plans:
            try:
                step = self._build_decode_step(batch_size, device, compiled, captured)
            except Exception as e:  # noqa: BLE001 - reported in decode_path, the next plan runs
                why.append(f"{'compiled' if compiled else 'eager'}{' + CUDA graph' if captured else ''} failed: "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
                continue
            self._decode_fn = step
            self.decode_path = ("compiled" if compiled else "eager static") + (" + CUDA graph" if captured else "")
            if why:
                self.decode_path += " (" + "; ".join(why) + ")"
            return step
        raise RuntimeError("no decode step could be built: " + "; ".join(why))

    @torch.inference_mode()
    def _build_decode_step(self, batch_size: int, device, compiled: bool, captured: bool):
        """One decode plan of compile_decode, run once (compiles, captures) so that it fails here if it
        fails at all. Its warm-up steps write position 0 of the static cache, which every prefill
        overwrites."""
        fn = torch.compile(self._last_logits, fullgraph=True, dynamic=False) if compiled else self._last_logits
        tok = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        pos = torch.zeros(1, dtype=torch.long, device=device)
        return StaticDecodeStep(fn, tok, pos, cuda_graph=captured)

    # --- forward ------------------------------------------------------------------

    def _hidden(self, idx, input_pos=None, doc_ids=None, rows=None):
        B, T = idx.shape
        x = self.tok_emb(idx)
        mask, is_causal, kv_end = None, False, None
        if input_pos is not None:
            if self._cache_len == 0:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_cache() first")
            if rows is not None:  # continuous batching: input_pos (B, T), every row at its own positions
                kv_end = int(input_pos.max()) + 1
                cos, sin = self.rope_cos[input_pos].unsqueeze(1), self.rope_sin[input_pos].unsqueeze(1)
                keys = torch.arange(kv_end, device=idx.device)
                mask = (keys <= input_pos[..., None]).unsqueeze(1)  # (B, 1, T, kv_end): its own past only
            elif self._cache_static:
                cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
                mask = self.causal_mask[input_pos].view(1, 1, T, -1)
            else:
                # eager decoding: positions are start..kv_end-1, so plain slices do (no gathers)
                kv_end = int(input_pos[-1]) + 1
                cos, sin = self.rope_cos[kv_end - T:kv_end], self.rope_sin[kv_end - T:kv_end]
                if T > 1:
                    if kv_end == T:
                        is_causal = True
                    else:
                        keys = torch.arange(kv_end, device=idx.device)
                        mask = (keys[None, :] <= input_pos[:, None]).view(1, 1, T, kv_end)
        else:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
            if doc_ids is not None:
                pos = positions_from_doc_ids(doc_ids)
                cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
                causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)
            else:
                cos, sin = self.rope_cos[:T], self.rope_sin[:T]
                is_causal = True
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, input_pos, kv_end, rows)
        return self.norm(x)

    def forward(self, idx, targets=None, loss_mask=None, input_pos=None, doc_ids=None, return_logits=None):
        """Returns (logits, loss). With targets the logits are skipped unless return_logits=True:
        the loss is averaged over positions whose target is not IGNORE_INDEX and, when given,
        whose loss_mask is 1. input_pos: positions of idx in the KV cache (after setup_cache);
        with the default (non-static) cache they must be consecutive, start..start+T-1."""
        h = self._hidden(idx, input_pos=input_pos, doc_ids=doc_ids)
        if targets is None:
            return self._head(h).float(), None
        loss = self._loss(h, targets, loss_mask)
        logits = self._head(h).float() if return_logits else None
        return logits, loss

    def _head(self, h):
        """The output layer: tied to the embedding, or a quantized model's own lm_head."""
        return F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)

    def _loss(self, h, targets, loss_mask):
        weight = self.tok_emb.weight
        h = h.reshape(-1, h.size(-1))
        t = targets.reshape(-1)
        if loss_mask is not None:
            t = torch.where(loss_mask.reshape(-1).bool(), t, torch.full_like(t, IGNORE_INDEX))
        count = (t != IGNORE_INDEX).sum().clamp(min=1)
        if self.lm_head is not None:  # a quantized model: inference only, no chunked backward
            logits = self._head(h).float()
            return F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum") / count
        n = h.size(0)
        chunk = max(1, self.loss_chunk_elems // weight.size(0))
        if n <= chunk:
            return _ce_sum(h, weight, t) / count
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            # checkpointing recomputes each chunk's logits in backward instead of storing them
            total = total + checkpoint(_ce_sum, h[i:i + chunk], weight, t[i:i + chunk], use_reentrant=False)
        return total / count

    # --- decoding -----------------------------------------------------------------

    @torch.inference_mode()
    def forward_rows(self, idx, positions, rows: slice, last_only: bool = True):
        """Continuous batching (serve.py): idx (B, T) tokens for the KV-cache rows `rows` (a slice of
        the cache setup_cache made), each row at its own positions (B, T) and attending to its own
        earlier positions only, so requests can join and leave a running batch at token boundaries.
        Returns float logits (B, V) of each row's last position, or (B, T, V) with last_only=False."""
        h = self._hidden(idx, input_pos=positions, rows=rows)
        return self._head(h[:, -1] if last_only else h).float()

    def setup_rows(self, batch: int):
        """Continuous batching's set-up (serve.py): a KV cache of `batch` rows over the whole context.
        Returns step(tokens (n, 1), positions (n, 1)) -> (n, V) float logits for rows 0..n-1, each at
        its own position: the lean step where it applies (generate's fastest path, the same numbers
        alone or among others), else the module path (forward_rows)."""
        self.setup_cache(batch, self.config.max_seq_len)
        if not self._lean_decode_ok():  # a model with hooks or swapped-in layers
            return lambda tokens, positions: self.forward_rows(tokens, positions, slice(0, tokens.shape[0]))
        plan = self._lean_plan()

        @torch.inference_mode()
        def step(tokens, positions):
            return self._lean_decode_step(plan, tokens, positions.view(-1))
        return step

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of KV-cache row src into row dst (a finished request's
        row is refilled by the last active one, so the active rows stay 0..n-1)."""
        for layer in self.layers:
            c = layer.attn.kv_cache
            c.k[dst, :, :length] = c.k[src, :, :length]
            c.v[dst, :, :length] = c.v[src, :, :length]

    def _last_logits(self, idx, input_pos):
        h = self._hidden(idx, input_pos=input_pos)
        return self._head(h[:, -1, :]).float()

    def _lean_decode_ok(self) -> bool:
        """True when every layer is a stock module or a layer that declares `lean_decode = True`
        (quantize.py's quantized layers: plain modules whose forward is all they do), with no hooks
        on any of them, so that the lean decode step below computes exactly what the module path
        does. Other swapped-in layers (LoRA wrappers, subclasses) or hooks (GPTQ calibration,
        profilers) make generate() use the module path instead."""
        from torch.nn.modules import module as nn_module
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        stock = (GPT, nn.Embedding, nn.ModuleList, Block, RMSNorm, Attention, MLP, nn.Linear, KVCache)
        return all((type(m) in stock or getattr(type(m), "lean_decode", False))
                   and not m._forward_hooks and not m._forward_pre_hooks for m in self.modules())

    def _lean_plan(self):
        """What _lean_decode_step runs: (embed, head, per-layer tuples). Matmuls are callables -
        F.linear bound to a stock weight, or a quantized layer's forward (no nn.Module.__call__)."""
        def fn(m):
            return partial(F.linear, weight=m.weight) if type(m) is nn.Linear else m.forward

        def group(parent, names):
            # the outputs of parent's linears `names` for one input: one matmul split in parts when
            # install_runtime_layers fused them (parent.fused_<names>), else one call each
            fused = getattr(parent, "fused_" + "_".join(names), None)
            if fused is not None:
                f, sizes = fused.forward, [getattr(parent, n).out_features for n in names]
                return lambda h: f(h).split(sizes, dim=-1)
            fns = [fn(getattr(parent, n)) for n in names]
            return lambda h: [g(h) for g in fns]

        emb = self.tok_emb
        embed = partial(F.embedding, weight=emb.weight) if type(emb) is nn.Embedding else emb.forward
        head = partial(F.linear, weight=emb.weight) if self.lm_head is None else self.lm_head.forward
        layers = [(b.attn_norm.weight, group(b.attn, ("wq", "wk", "wv")), fn(b.attn.wo), b.mlp_norm.weight,
                   group(b.mlp, ("w_gate", "w_up")), fn(b.mlp.w_down), b.attn.kv_cache.k, b.attn.kv_cache.v)
                  for b in self.layers]
        return embed, head, layers

    def _lean_decode_step(self, plan, tok, pos):
        """One token per row through the eager KV cache: the module path's math with the matmuls
        called directly, slices instead of gathers and no no-op casts. At batch 1 on a CPU,
        module-call and indexing overhead is a third of the step for the small presets; this is what
        makes decode ~1.6x faster than HF's generate there. `pos`: a Python int (every row at that
        position: generate's batch) or a (B,) LongTensor (each cache row at its own position, masked
        to its own past: serve.py's continuous batching). `plan` is _lean_plan()'s (embed, head,
        per-layer tuples of norms, matmuls, cache buffers)."""
        embed, head, layers = plan
        B = tok.shape[0]
        c = self.config
        H, KV, hd, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
        # one position per row, so x stays (B, d) and (B, H*hd) -> (B, H, 1, hd) is a free view
        x = embed(tok.view(B))
        per_row = torch.is_tensor(pos)
        if per_row:
            end, rows = int(pos.max()) + 1, torch.arange(B, device=pos.device)
            cos, sin = self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None]
            # a KV head's query heads as its query rows (B, KV, H/KV, hd): GQA with a per-row mask, no K/V copy
            mask = (torch.arange(end, device=pos.device) <= pos[:, None])[:, None, None]
        else:
            end, cos, sin = pos + 1, self.rope_cos[pos:pos + 1], self.rope_sin[pos:pos + 1]
        gqa = KV != H
        for an, qkv, wo, mn, gate_up, wd, kc, vc in layers:
            h = F.rms_norm(x, an.shape, an, eps)
            q, k, v = qkv(h)
            q = apply_rope(q.view(B, H, 1, hd), cos, sin)
            k = apply_rope(k.view(B, KV, 1, hd), cos, sin)
            v = v.view(B, KV, 1, hd)
            if k.dtype != kc.dtype:
                k, v, q = k.to(kc.dtype), v.to(kc.dtype), q.to(kc.dtype)
            if per_row:
                kc[rows, :, pos] = k.view(B, KV, hd)
                vc[rows, :, pos] = v.view(B, KV, hd)
                y = F.scaled_dot_product_attention(q.view(B, KV, H // KV, hd), kc[:B, :, :end], vc[:B, :, :end],
                                                   attn_mask=mask)
            else:
                kc[:B, :, pos:pos + 1] = k
                vc[:B, :, pos:pos + 1] = v
                y = F.scaled_dot_product_attention(q, kc[:B, :, :end], vc[:B, :, :end], enable_gqa=gqa)
            y = y.reshape(B, H * hd)
            x = x + wo(y if y.dtype == x.dtype else y.to(x.dtype))
            h = F.rms_norm(x, mn.shape, mn, eps)
            g, u = gate_up(h)
            x = x + wd(F.silu(g) * u)
        x = F.rms_norm(x, self.norm.weight.shape, self.norm.weight, eps)
        return head(x).float()

    def _start_decode(self, idx, total: int):
        """Set up the KV cache (or the compiled step, with fast_decode) for B rows and `total`
        positions, and prefill idx. Returns (step(tok (B, 1), pos) -> (B, V) logits, the prefill's
        last logits). The one decode set-up of generate_stream and teacher_forced_logits."""
        B, T = idx.shape
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({total - T}) exceeds the model's "
                             f"context of {self.config.max_seq_len}: shorten the prompt or lower max_new_tokens")
        dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) else None
        cache = self.layers[0].attn.kv_cache
        wrong_dtype = cache is not None and dtype is not None and cache.k.dtype != dtype
        if self.fast_decode and (self._decode_fn is None or self._cache_batch != B or wrong_dtype):
            self.compile_decode(B, dtype=dtype)  # the whole context: one graph serves every length
        elif self._decode_fn is not None and (self._cache_batch != B or self._cache_len < total or wrong_dtype):
            # a step compiled for other shapes: build it again for these (same compile/graph settings)
            self.compile_decode(B, max(total, self._cache_len), *self._decode_settings, dtype=dtype)
        elif self._cache_len < total or self._cache_batch < B or wrong_dtype:
            self.setup_cache(B, max(total, self._cache_len if not self._cache_static else 0) or total,
                             dtype=dtype, static=self._cache_static)
        positions = torch.arange(total, device=idx.device)
        logits = self._last_logits(idx, positions[:T])  # the prefill runs eagerly (its length varies)
        if self._decode_fn is not None:
            fn = self._decode_fn
            # a CUDA graph's output buffer is overwritten by the next replay: hand out a copy
            return (lambda tok, pos: fn(tok, positions[pos:pos + 1]).clone()), logits
        if not self._cache_static and self._lean_decode_ok():
            plan = self._lean_plan()
            return (lambda tok, pos: self._lean_decode_step(plan, tok, pos)), logits
        return (lambda tok, pos: self._last_logits(tok, positions[pos:pos + 1])), logits

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                        generator=None):
        """Yield the (B,) next tokens one step at a time, using the KV cache.
        Rows that produced eos_id keep producing eos_id; stops when every row is done."""
        B, T = idx.shape
        if max_new_tokens <= 0:
            if T + max_new_tokens > self.config.max_seq_len:
                raise ValueError(f"prompt ({T} tokens) exceeds the model's context of {self.config.max_seq_len}")
            return
        step, logits = self._start_decode(idx, T + max_new_tokens)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        with _cyclic_gc_paused():
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done = done | (nxt == eos_id)
                yield nxt
                if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                    break
                logits = step(nxt[:, None], T + i)

    @torch.inference_mode()
    def teacher_forced_logits(self, idx, prompt_len: int):
        """(B, T - prompt_len + 1, V) float logits of the decode loop when it is fed idx's own tokens
        after prefilling its first prompt_len: the prefill's last logits, then one per decode step.
        Compares decode paths (compiled CUDA graph vs eager) step by step, which greedy text cannot
        do: one flipped near-tie changes every later input."""
        B, T = idx.shape
        step, logits = self._start_decode(idx[:, :prompt_len], T)
        out = [logits]
        for i in range(prompt_len, T):
            out.append(step(idx[:, i:i + 1], i))
        return torch.stack(out, dim=1).float()

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None):
        """(B, T) prompt -> (B, T + n) tokens; temperature 0 = greedy."""
        new = [t[:, None] for t in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                                        generator)]
        return torch.cat([idx] + new, dim=1)


# -----------------------------------------------------------------------------
# Text generation: the one prompt -> tokens path of generate.py, scoring.LM and train.py's samples

# A token stream maps a (B, T) prompt to an iterator of (B,) new-token tensors, one per step.
# model.generate_stream is the default; tests inject fake streams to check the stop logic.
TokenStream = Callable[[torch.Tensor], Iterator[torch.Tensor]]


def model_token_stream(model: GPT, *, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None, compile: bool = False,
                       use_compile: bool = True) -> TokenStream:
    """The default token stream: model.generate_stream. With compile=True the decode steps run on
    a static KV cache through a torch.compile'd step (model.compile_decode): made once per batch
    size and kept across calls (chat turns), so a CUDA graph's buffers stay put.
    use_compile=False runs the same static-cache loop eagerly."""
    def stream(idx):
        if compile and model._decode_fn is None:  # (a new batch size: generate_stream builds it again)
            model.compile_decode(idx.shape[0], use_compile=use_compile)
        # eos_id=None: stopping is decided in stream_generate, which knows every stop id
        # (<|endoftext|> and <|im_end|> in chat), not just one.
        return model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     eos_id=None, generator=generator)
    return stream


def stream_generate(model: GPT, prompt_ids: list[int], max_new_tokens: int = 200, *,
                    temperature: float = 0.8, top_k: int | None = 200, top_p: float | None = None,
                    stop_ids: Iterable[int] | None = None, num_samples: int = 1,
                    generator: torch.Generator | None = None, compile: bool = False,
                    token_stream: TokenStream | None = None) -> Iterator[list[int | None]]:
    """Generate `num_samples` continuations of `prompt_ids` as one batch.

    Yields, per decoding step, a list with one entry per sample: the new token id, or None once
    that sample has produced a stop token (the stop token itself is yielded, then None). Stops
    as soon as every sample is done or after max_new_tokens steps. stop_ids defaults to the
    tokenizer's EOS id. Pass `token_stream` to replace the model's decode loop (tests).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one token (e.g. the EOS id)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_new_tokens <= 0:
        return
    if stop_ids is None:
        tok = getattr(model, "tokenizer", None)
        eos = getattr(tok, "eos_id", None)
        stop_ids = [] if eos is None else [eos]
    stops = {int(s) for s in stop_ids}
    device = next(model.parameters()).device
    idx = torch.tensor([list(prompt_ids)] * num_samples, dtype=torch.long, device=device)
    if token_stream is None:
        token_stream = model_token_stream(model, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=generator, compile=compile)
    done = [False] * num_samples
    steps = 0
    stream = token_stream(idx)
    try:
        for new in stream:
            new = new.view(-1).tolist()
            out: list[int | None] = []
            for i, t in enumerate(new[:num_samples]):
                if done[i]:
                    out.append(None)
                    continue
                out.append(int(t))
                if int(t) in stops:
                    done[i] = True
            yield out
            steps += 1
            if all(done) or steps >= max_new_tokens:
                break
    finally:
        # Closing the model's generator lets it release its KV cache promptly.
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def generate_samples(model: GPT, prompt_ids: list[int], max_new_tokens: int = 200, *,
                     stop_ids: Iterable[int] | None = None, keep_stop: bool = False,
                     on_step: Callable[[], None] | None = None, **kwargs) -> list[list[int]]:
    """Non-streaming helper: the new token ids of every sample (stop tokens dropped unless
    keep_stop). on_step() is called after each decoding step (a progress bar). Takes the same
    keyword arguments as stream_generate."""
    if stop_ids is None:
        eos = getattr(getattr(model, "tokenizer", None), "eos_id", None)
        stop_ids = [] if eos is None else [eos]
    stops = {int(s) for s in stop_ids}
    num_samples = kwargs.get("num_samples", 1)
    rows: list[list[int]] = [[] for _ in range(num_samples)]
    for step in stream_generate(model, prompt_ids, max_new_tokens, stop_ids=stops, **kwargs):
        for i, t in enumerate(step):
            if t is not None and (keep_stop or t not in stops):
                rows[i].append(t)
        if on_step is not None:
            on_step()
    return rows


# -----------------------------------------------------------------------------
# Optimizer and FLOPs


def weight_decay_split(model):
    """(decay, no_decay) parameter names: decay only 2-D matmul weights, never the embedding,
    norms or any 1-D parameter."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("tok_emb.weight") else no_decay).append(name)
    return decay, no_decay


def param_groups(model, weight_decay):
    params = dict(unwrap(model).named_parameters())
    decay, no_decay = weight_decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def configure_optimizers(model, weight_decay=0.1, lr=5e-4, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
    # the fused CUDA kernel does the whole update in one launch
    fused = device_type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def estimate_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L d T."""
    return 6 * count_params(config) + 12 * config.n_layers * config.d_model * seq_len


def estimate_mfu(tokens_per_sec, config: ModelConfig, seq_len, peak_flops) -> float:
    return tokens_per_sec * estimate_flops_per_token(config, seq_len) / peak_flops


# dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "A6000": 155e12, "V100": 125e12, "T4": 65e12}


def device_peak_flops(device, dtype=torch.bfloat16):
    """Peak bf16/fp16 FLOP/s of a known GPU, None on CPU or for an unknown one."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16.items():
        if key in name:
            return peak if dtype in (torch.bfloat16, torch.float16) else None
    return None


# -----------------------------------------------------------------------------
# The quantized .bin format and its runtime (docs/FORMAT.md): the tensors (`QTensor`, round-to-nearest
# int8/int4 and fp16), the file (`write_quantized`, `read_quantized`) and the plain modules a `.bin`
# runs on (`Int8Linear`, `Int4Linear` on torch's int8/int4 weight-only kernels, fp16 layers,
# quantized embeddings), installed into a GPT by `install_runtime_layers`. load_model reads a .bin
# through them; quantize.py (the command) chooses what to quantize and how, and writes the files.

DEFAULT_GROUP_SIZE = 128
FORMAT_NAME = "fishai-quantized"
FORMAT_VERSION = 1
ALIGN = 64                                      # payload parts start on 64-byte boundaries (mmap/SIMD friendly)
PREAMBLE = struct.Struct("<8sIIQQ")             # magic (QUANT_MAGIC), version, flags, header_len, payload_len
CHECKSUM_LEN = 32                               # SHA-256 trailer
QTYPES = ("f32", "f16", "q8", "q4")
# Smallest positive fp16 value (subnormal): scales are stored in fp16, a zero scale would lose the row.
_FP16_TINY = 2.0 ** -24


class QuantizeError(common.FishAIError):
    """Bad input for an export (flag combination, calibration or eval data, weights out of range)."""


# ----------------------------------------------------------------------------------------------
# INT4 packing

def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack values 0..15 two per byte: element 2i in the low nibble, 2i+1 in the high nibble.
    An odd count gets a zero high nibble in the last byte."""
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() > 15):
        raise ValueError("pack_int4: values must be in 0..15")
    flat = flat.astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of pack_int4: the first n 4-bit values as uint8."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != (n + 1) // 2:
        raise ValueError(f"unpack_int4: {packed.size} bytes cannot hold exactly {n} values")
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


# ----------------------------------------------------------------------------------------------
# Quantized tensors

@dataclass
class QTensor:
    """One tensor in its stored form. codes: f32/f16 values, int8 codes (q8) or 0..15 codes (q4),
    always shaped like the tensor. scales/zeros: fp16, (rows,) for q8 and (rows, n_groups) for q4."""
    qtype: str
    shape: tuple
    codes: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int | None = None
    method: str = "rtn"

    def dequantize(self) -> torch.Tensor:
        if self.qtype in ("f32", "f16"):
            return self.codes.float()
        if self.qtype == "q8":
            return self.codes.float() * self.scales.float()[:, None]
        rows, cols = self.shape
        idx = torch.arange(cols) // self.group_size                  # group index of every column
        s = self.scales.float()[:, idx]
        z = self.zeros.float()[:, idx]
        return (self.codes.float() - z) * s

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in encode_parts(self).values())


def _n_groups(cols: int, group_size: int) -> int:
    return (cols + group_size - 1) // group_size


def _check_group_size(group_size: int) -> None:
    if group_size < 1:
        raise QuantizeError(f"--group-size must be >= 1 (got {group_size})")


def _fp16_scale(scale: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Round scales to fp16 (what is stored), keeping them positive and finite."""
    s16 = scale.to(torch.float16)
    if not torch.isfinite(s16).all():
        raise QuantizeError(f"{name}: weights too large for an fp16 scale (|w| > {65504 * 127:g})")
    return torch.where(s16 == 0, torch.full_like(s16, _FP16_TINY), s16)


def int8_row_scales(w: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    return _fp16_scale(w.abs().amax(dim=1) / 127.0, name)


def int8_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = scales.float()
    while s.dim() < w.dim():
        s = s.unsqueeze(-1)
    return torch.clamp(torch.round(w / s), -127, 127)


def int4_params(x: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit params over the last dim of x (..., n): fp16 scale and integer zero 0..15.
    The range always includes 0 (as in GPTQ), so zero padding and exact zeros are representable."""
    mn = torch.clamp(x.amin(dim=-1), max=0.0)
    mx = torch.clamp(x.amax(dim=-1), min=0.0)
    scale = _fp16_scale((mx - mn) / 15.0, name)
    zero = torch.clamp(torch.round(-mn / scale.float()), 0, 15)
    return scale, zero.to(torch.float16)


def int4_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    s, z = scale.float(), zero.float()
    while s.dim() < x.dim():
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
    return torch.clamp(torch.round(x / s) + z, 0, 15)


def quantize_rtn(w: torch.Tensor, qtype: str, group_size: int = DEFAULT_GROUP_SIZE,
                 name: str = "tensor") -> QTensor:
    """Round-to-nearest quantization of one tensor into qtype."""
    w = w.detach().float().cpu()
    shape = tuple(w.shape)
    if qtype == "f32":
        return QTensor("f32", shape, w.clone())
    if qtype == "f16":
        if w.abs().max() > 65504:
            raise QuantizeError(f"{name}: values exceed the fp16 range; use --strategy fp32")
        return QTensor("f16", shape, w.to(torch.float16))
    if w.dim() != 2:
        raise ValueError(f"{name}: {qtype} needs a 2-D tensor, got shape {list(shape)}")
    if qtype == "q8":
        scales = int8_row_scales(w, name)
        return QTensor("q8", shape, int8_codes(w, scales).to(torch.int8), scales=scales)
    if qtype == "q4":
        _check_group_size(group_size)
        rows, cols = shape
        ng = _n_groups(cols, group_size)
        # Pad the last group with zeros only for computing its params: the range includes 0 anyway,
        # so the padding does not change them, and padded codes are never stored.
        padded = torch.nn.functional.pad(w, (0, ng * group_size - cols)).view(rows, ng, group_size)
        scale, zero = int4_params(padded, name)
        codes = int4_codes(padded, scale, zero).view(rows, ng * group_size)[:, :cols]
        return QTensor("q4", shape, codes.to(torch.uint8), scales=scale, zeros=zero, group_size=group_size)
    raise ValueError(f"unknown quant type {qtype!r} (expected one of {', '.join(QTYPES)})")


def encode_parts(qt: QTensor) -> dict[str, bytes]:
    """The little-endian byte strings stored for one tensor (see docs/FORMAT.md)."""
    if qt.qtype == "f32":
        return {"data": qt.codes.numpy().astype("<f4").tobytes()}
    if qt.qtype == "f16":
        return {"data": qt.codes.numpy().astype("<f2").tobytes()}
    if qt.qtype == "q8":
        return {"data": qt.codes.numpy().astype(np.int8).tobytes(),
                "scales": qt.scales.numpy().astype("<f2").tobytes()}
    if qt.qtype == "q4":
        return {"data": pack_int4(qt.codes.numpy()).tobytes(),
                "scales": qt.scales.numpy().astype("<f2").reshape(-1).tobytes(),
                "zeros": qt.zeros.numpy().astype("<f2").reshape(-1).tobytes()}
    raise ValueError(f"unknown quant type {qt.qtype!r}")


def expected_part_lengths(qtype: str, shape: list[int], group_size: int | None) -> dict[str, int]:
    n = int(np.prod(shape)) if shape else 1
    if qtype == "f32":
        return {"data": 4 * n}
    if qtype == "f16":
        return {"data": 2 * n}
    if qtype == "q8":
        return {"data": n, "scales": 2 * shape[0]}
    if qtype == "q4":
        ng = shape[0] * _n_groups(shape[1], group_size)
        return {"data": (n + 1) // 2, "scales": 2 * ng, "zeros": 2 * ng}
    raise ValueError(f"unknown quant type {qtype!r}")


def decode_parts(qtype: str, shape: list[int], group_size: int | None, parts: dict[str, bytes]) -> QTensor:
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if qtype == "f32":
        data = np.frombuffer(parts["data"], "<f4").astype(np.float32).reshape(shape)
        return QTensor("f32", shape, torch.from_numpy(data))
    if qtype == "f16":
        data = np.frombuffer(parts["data"], "<f2").astype(np.float16).reshape(shape)
        return QTensor("f16", shape, torch.from_numpy(data))
    if qtype == "q8":
        codes = torch.from_numpy(np.frombuffer(parts["data"], np.int8).copy().reshape(shape))
        scales = torch.from_numpy(np.frombuffer(parts["scales"], "<f2").astype(np.float16))
        return QTensor("q8", shape, codes, scales=scales)
    if qtype == "q4":
        rows, cols = shape
        ng = _n_groups(cols, group_size)
        codes = torch.from_numpy(unpack_int4(np.frombuffer(parts["data"], np.uint8), n).reshape(shape))
        scales = torch.from_numpy(np.frombuffer(parts["scales"], "<f2").astype(np.float16).reshape(rows, ng))
        zeros = torch.from_numpy(np.frombuffer(parts["zeros"], "<f2").astype(np.float16).reshape(rows, ng))
        return QTensor("q4", shape, codes, scales=scales, zeros=zeros, group_size=group_size)
    raise ValueError(f"unknown quant type {qtype!r}")


# ----------------------------------------------------------------------------------------------
# The .bin format (docs/FORMAT.md)

def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _payload_layout(tensors: dict) -> tuple[list[dict], list[tuple[int, bytes]], int]:
    """The header's tensor table, the (offset, bytes) blobs of the payload and its length."""
    entries, blobs, offset = [], [], 0
    for name, qt in tensors.items():
        parts = {}
        for part, data in encode_parts(qt).items():
            offset = _align(offset)
            parts[part] = {"offset": offset, "length": len(data)}
            blobs.append((offset, data))
            offset += len(data)
        entry = {"name": name, "qtype": qt.qtype, "shape": list(qt.shape), "parts": parts}
        if qt.qtype == "q4":
            entry["group_size"] = qt.group_size
        if qt.method != "rtn":
            entry["method"] = qt.method
        entries.append(entry)
    return entries, blobs, offset


def write_quantized(path, tensors: dict, model_config: dict, tokenizer: dict | None = None,
                    meta: dict | None = None) -> int:
    """Write {name: QTensor} as a FishAI quantized file (atomic). Returns the file size in bytes."""
    entries, blobs, payload_len = _payload_layout(tensors)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_config": model_config,
              "tokenizer": tokenizer, "tensors": entries, **(meta or {})}
    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    payload_start = _align(PREAMBLE.size + len(header_bytes))

    def write(f):
        h = hashlib.sha256()

        def put(b):
            f.write(b)
            h.update(b)

        put(PREAMBLE.pack(QUANT_MAGIC, FORMAT_VERSION, 0, len(header_bytes), payload_len))
        put(header_bytes)
        put(b"\0" * (payload_start - PREAMBLE.size - len(header_bytes)))
        pos = 0
        for off, data in blobs:
            put(b"\0" * (off - pos))
            put(data)
            pos = off + len(data)
        f.write(h.digest())

    common.atomic_write(path, write)
    return payload_start + payload_len + CHECKSUM_LEN


def _check_layout(path: Path, raw: bytes, verify: bool) -> tuple[int, int, int]:
    """Validate the preamble, the size and the checksum in the order docs/FORMAT.md gives.
    Returns (header_len, payload_start, payload_len)."""
    err = CheckpointError
    if len(raw) < PREAMBLE.size:
        raise err(f"{path}: truncated ({len(raw)} bytes, shorter than the {PREAMBLE.size}-byte "
                  "preamble); re-export it with quantize.py")
    magic, version, _flags, header_len, payload_len = PREAMBLE.unpack_from(raw, 0)
    if magic != QUANT_MAGIC:
        raise err(f"{path}: not a FishAI quantized file (magic {magic!r}, expected {QUANT_MAGIC!r})")
    if version > FORMAT_VERSION:
        raise err(f"{path}: format version {version} is newer than this reader supports "
                  f"({FORMAT_VERSION}); update FishAI Train to load it")
    if version < 1:
        raise err(f"{path}: invalid format version {version}; re-export it with quantize.py")
    payload_start = _align(PREAMBLE.size + header_len)
    expected = payload_start + payload_len + CHECKSUM_LEN
    if len(raw) < expected:
        raise err(f"{path}: truncated ({len(raw)} of {expected} bytes); the copy or export was "
                  "interrupted, re-copy or re-export it")
    if len(raw) > expected:
        raise err(f"{path}: {len(raw) - expected} unexpected trailing bytes after the checksum; "
                  "the file is damaged, re-export it")
    body = memoryview(raw)[:expected - CHECKSUM_LEN]
    if verify and hashlib.sha256(body).digest() != raw[expected - CHECKSUM_LEN:]:
        raise err(f"{path}: checksum mismatch, the file is corrupted; re-copy or re-export it")
    return header_len, payload_start, payload_len


def _decode_entry(e: dict, raw: memoryview, payload_start: int, payload_len: int) -> QTensor:
    """One tensor of the header's table, read from the payload (ValueError/KeyError when malformed).
    raw is a memoryview: the parts are read in place (decode_parts copies), not sliced into copies."""
    qtype, shape, gs = e["qtype"], e["shape"], e.get("group_size")
    parts = {}
    for part, n in expected_part_lengths(qtype, shape, gs).items():
        off, length = e["parts"][part]["offset"], e["parts"][part]["length"]
        if length != n or off < 0 or off + length > payload_len:
            raise ValueError(f"tensor {e['name']} part {part}: bad offset/length")
        parts[part] = raw[payload_start + off:payload_start + off + length]
    qt = decode_parts(qtype, shape, gs, parts)
    qt.method = e.get("method", "rtn")
    return qt


def read_quantized(path, verify: bool = True) -> tuple[dict, dict]:
    """Read and validate a quantized file. Returns (header, {name: QTensor}).
    Raises model.CheckpointError naming the file for every malformed input."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read quantized model ({e.strerror})") from None
    header_len, payload_start, payload_len = _check_layout(path, raw, verify)
    try:
        header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len].decode("utf-8"))
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"format {header.get('format')!r}")
        view = memoryview(raw)
        tensors = {e["name"]: _decode_entry(e, view, payload_start, payload_len) for e in header["tensors"]}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: malformed header ({err}); re-export it with quantize.py") from None
    return header, tensors


def release_freed_memory() -> None:
    """Hand the heap memory that loading freed (the decoded codes, the int32 input of the int4
    packing) back to the OS: glibc keeps it otherwise, and a process holds 2-4x the file resident
    after the load (measured, small: int4 82 MB -> 31 MB, int8 66 -> 42, mixed 142 -> 69 for files
    of 17, 33 and 41 MB). glibc's malloc_trim; nothing elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


# ----------------------------------------------------------------------------------------------
# Running quantized: the layers load_model builds from a .bin (plain modules, as in gpt-fast)
#
# torch's CPU int8/int4 weight-only kernels are vectorized for bf16 activations only; fp32
# activations take a scalar loop. Microseconds per call, measured here (AMD EPYC, AVX512-BF16,
# 1 thread, `small`'s shapes; ratios within one run):
#                               1408x512 (MLP)      32000x512 (output head)
#                               batch 1   batch 8   batch 1   batch 8
#   fp32 F.linear                  48       193      4733      8727
#   fp16 F.linear                  70       562      1647     13065
#   int8 kernel, bf16 input        27        94       730      2810
#   int4 kernel, bf16 input        27        84       509      1844
#   int8 kernel, fp32 input       534      6981         -         -
# So a quantized layer casts its input to bf16 for the kernel and the result back to the model
# dtype; norms, attention, the residual stream and the KV cache stay in the model dtype.

KERNEL_DTYPE = torch.bfloat16
INT4_KERNEL_GROUPS = (32, 64, 128, 256)     # the group sizes torch's int4 kernels take
_KERNEL_OK: dict = {}                       # (kind, device type) -> the kernel runs and is right here


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _flat2d(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x (..., K) as the contiguous (M, K + pad) bf16 matrix the kernels take (zeros appended).
    The decode step's x is already 2-D: every op saved counts at batch 1 (~2 us each)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, pad))
    return x2.to(KERNEL_DTYPE).contiguous()


def _unflat(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's (M, N) result in x's dtype and leading shape."""
    y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class Int8Linear(torch.nn.Module):
    """y = x W^T with W = codes * scales[:, None] (the .bin's q8: int8 codes, one scale per
    output row): torch's _weight_int8pack_mm (CPU and CUDA) on bf16 activations (`kernel`), or the
    layer dequantized for each call (never kept) where that kernel is missing. weight: (N, K + pad)
    int8, zero columns appended for the kernel; scales (N,). Made by int8_linear."""
    lean_decode = True  # model.GPT's fast decode step may call forward directly

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, in_features: int, kernel: bool):
        super().__init__()
        self.out_features, self.in_features, self.kernel = weight.shape[0], in_features, kernel
        self.pad = weight.shape[1] - in_features
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def rows(self, start: int, stop: int) -> "Int8Linear":
        """The layer of output rows start:stop, on row slices of this one's tensors (no copy)."""
        return Int8Linear(self.weight[start:stop], self.scales[start:stop], self.in_features, self.kernel)

    def forward(self, x):
        if self.kernel:  # torch._weight_int8pack_mm: torch.ops.aten's op, ~1 us less Python per call
            y = torch._weight_int8pack_mm(_flat2d(x, self.pad), self.weight, self.scales)
        else:
            y = torch.nn.functional.linear(x, self.weight[:, :self.in_features].to(x.dtype)) * self.scales.to(x.dtype)
        return _unflat(y, x)


def int8_linear(codes: torch.Tensor, scales: torch.Tensor, device, kernel: bool | None = None) -> Int8Linear:
    """The Int8Linear of (N, K) int8 codes and (N,) scales on `device` (kernel: None = if it works here)."""
    device = torch.device(device)
    kernel = _kernel_ok("int8", device) if kernel is None else kernel
    # the CPU kernel steps through K by 16 (other K give NaN or crash, measured): zero columns
    # here, zeros appended to x in forward
    pad = _round_up(codes.shape[1], 16) - codes.shape[1] if kernel else 0
    weight = torch.nn.functional.pad(codes.to(torch.int8), (0, pad)).contiguous()
    return Int8Linear(weight.to(device), scales.to(device, KERNEL_DTYPE if kernel else torch.float32),
                      codes.shape[1], kernel)


def int8_from_float(w: torch.Tensor, device, name: str = "tensor") -> Int8Linear:
    """A float weight quantized per row exactly as the .bin's q8 (int8_row_scales / int8_codes)."""
    w = w.float().cpu()
    scales = int8_row_scales(w, name)
    return int8_linear(int8_codes(w, scales), scales, device)


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, ceil(K/2)) uint8, two per byte along each row (even column low)."""
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, codes.shape[1] % 2))
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def _unpack_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)[:, :cols]


def _dequant_rows(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  dtype) -> torch.Tensor:
    """(codes - zero) * scale of (R, K) codes with (R, groups) fp32 scales/zeros, in dtype (fp32:
    bit-identical to QTensor.dequantize)."""
    g = torch.arange(codes.shape[1], device=codes.device) // group_size
    return (codes.to(dtype) - zeros[:, g].to(dtype)) * scales[:, g].to(dtype)


def int4_mode(device, rows: int, group_size: int) -> str:
    """How an int4 layer of `rows` output rows runs here: "cpu" / "cuda" (torch's int4 kernel,
    when it exists and is right on this device) or "dequant" (dequantized for each call)."""
    kind = torch.device(device).type
    if group_size not in INT4_KERNEL_GROUPS or kind not in ("cpu", "cuda"):
        return "dequant"
    if rows % (16 if kind == "cpu" else 8):     # the CPU packing takes rows in blocks of 16, CUDA's 8
        return "dequant"
    return kind if _kernel_ok("int4", device) else "dequant"


def _int4pack(codes: torch.Tensor, pad: int, mode: str, device) -> torch.Tensor:
    """(N, K) codes, `pad` zero columns appended, in the layout of the device's int4 kernel. CPU:
    blocks of output rows (see _int4_cpu_index). CUDA (tinygemm): a tiled layout, in blocks of 8
    rows, built from bytes that hold the EVEN column in the HIGH nibble, with as many 16-column
    k-tiles per inner step as K allows. Both layouts keep whole row blocks apart, so the rows are
    packed 4096 at a time: the int32 codes the converters take would be 8x the packed size."""
    k = codes.shape[1] + pad
    tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    out = []
    for chunk in codes.split(4096):
        c = torch.nn.functional.pad(chunk.to(device, torch.int32), (0, pad))
        if mode == "cpu":
            out.append(torch._convert_weight_to_int4pack_for_cpu(c.contiguous(), 2))
        else:
            out.append(torch._convert_weight_to_int4pack(((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8), tiles))
    return torch.cat(out) if len(out) > 1 else out[0]


def _kernel_group(cols: int, group_size: int) -> int:
    """The group size the int4 kernel runs with: the largest kernel group that divides both the
    file's group size and the row length (a file group is then several kernel groups with the same
    scale and zero: exact, no padding; e.g. 704 columns in groups of 128 run as 11 groups of 64),
    else the file's own (the row is then padded to whole groups)."""
    fits = [g for g in INT4_KERNEL_GROUPS if g <= group_size and group_size % g == 0 and cols % g == 0]
    return max(fits) if fits else group_size


class Int4Linear(torch.nn.Module):
    """y = x W^T with W[r, c] = (code - zero[r, g]) * scale[r, g], g = c // group_size (the .bin's
    q4). mode "cpu" / "cuda": torch's _weight_int4pack_mm_for_cpu / _weight_int4pack_mm on bf16
    activations, which dequantize in the kernel as (q - 8) * scale + offset (our integer zero
    point becomes offset = (8 - zero) * scale): buffers weight (the kernel's packing of the codes,
    padded to K + pad columns) and scales_and_zeros (K / kernel_group, N, 2). mode "dequant" (no
    kernel for the device or shape): weight row-packed (N, ceil(K/2)) uint8, fp32 scales and zeros
    (N, groups), the layer dequantized for each call, never kept. Made by int4_linear."""
    lean_decode = True

    def __init__(self, mode: str, in_features: int, group_size: int, kernel_group: int, pad: int, **buffers):
        super().__init__()
        self.mode, self.in_features, self.group_size = mode, in_features, group_size
        self.kernel_group, self.pad = kernel_group, pad
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.out_features = (self.scales if mode == "dequant" else self.scales_and_zeros[0]).shape[0]

    def rows(self, start: int, stop: int) -> "Int4Linear":
        """The layer of output rows start:stop on slices of this one's codes (whole blocks of the
        kernel layout; the caller checks the slice is that layer) and its own scales."""
        n, w = self.out_features, self.weight
        codes = w[start * w.shape[0] // n:stop * w.shape[0] // n]
        if self.mode == "dequant":
            buffers = {"weight": codes, "scales": self.scales[start:stop], "zeros": self.zeros[start:stop]}
        else:
            buffers = {"weight": codes, "scales_and_zeros": self.scales_and_zeros[:, start:stop].contiguous()}
        return Int4Linear(self.mode, self.in_features, self.group_size, self.kernel_group, self.pad, **buffers)

    def forward(self, x):
        if self.mode == "dequant":
            w = _dequant_rows(_unpack_rows(self.weight, self.in_features), self.scales, self.zeros,
                              self.group_size, x.dtype)
            return torch.nn.functional.linear(x, w)
        op = torch._weight_int4pack_mm_for_cpu if self.mode == "cpu" else torch._weight_int4pack_mm
        return _unflat(op(_flat2d(x, self.pad), self.weight, self.kernel_group, self.scales_and_zeros), x)


def int4_linear(qt: QTensor, device, mode: str | None = None) -> Int4Linear:
    """The Int4Linear of a q4 QTensor on `device` (mode: None = the kernel when it works here). The
    .bin's shorter last group runs as smaller kernel groups where it can (_kernel_group), else the
    row is padded with zero columns to a whole group and x with zeros (as gpt-fast pads)."""
    device = torch.device(device)
    (n, k), g = qt.shape, qt.group_size
    mode = mode or int4_mode(device, n, g)
    if mode == "dequant":
        return Int4Linear(mode, k, g, g, 0, weight=_pack_rows(qt.codes).to(device),
                          scales=qt.scales.to(device, torch.float32), zeros=qt.zeros.to(device, torch.float32))
    kg = _kernel_group(k, g)
    pad = _round_up(k, kg) - k
    s, z = (t.float().repeat_interleave(g // kg, dim=1)[:, :(k + pad) // kg] for t in (qt.scales, qt.zeros))
    sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous()         # (groups, N, 2)
    return Int4Linear(mode, k, g, kg, pad, weight=_int4pack(qt.codes, pad, mode, device),
                      scales_and_zeros=sz.to(device, KERNEL_DTYPE))


def _kernel_ok(kind: str, device) -> bool:
    """Whether torch's int8 / int4 kernel runs on this device and matches the dequantized weights,
    checked once per device type on a small layer. A torch without the kernel (or with another
    weight layout) gets the dequantize-per-call layers instead of an error."""
    device = torch.device(device)
    key = (kind, device.type)
    if key not in _KERNEL_OK:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 256, generator=g), torch.randn(64, 256, generator=g)
        qt = quantize_rtn(w, "q8" if kind == "int8" else "q4", 128)
        try:
            layer = (int8_linear(qt.codes, qt.scales, device, kernel=True) if kind == "int8"
                     else int4_linear(qt, device, mode=device.type))
            ref = x @ qt.dequantize().T
            err = (layer(x.to(device)).float().cpu() - ref).abs().max()
            _KERNEL_OK[key] = bool(err <= 0.02 * ref.abs().max())
        except (RuntimeError, AttributeError):  # no such kernel in this torch, or not for this device
            _KERNEL_OK[key] = False
    return _KERNEL_OK[key]


class HalfLinear(torch.nn.Module):
    """A weight kept as the .bin's fp16 and cast to the activation dtype for each call: the
    memory of the file, fp32 numerics (every fp16 value is exact in fp32)."""
    lean_decode = True

    def __init__(self, weight16: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight16.shape
        self.register_buffer("weight", weight16)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype))


class HalfEmbedding(torch.nn.Module):
    """Lookups in the .bin's fp16 table, returned in the model dtype."""
    lean_decode = True

    def __init__(self, weight16: torch.Tensor, dtype):
        super().__init__()
        self.register_buffer("weight", weight16)
        self.out_dtype = dtype

    def forward(self, idx):
        return torch.nn.functional.embedding(idx, self.weight).to(self.out_dtype)


class Int8Embedding(torch.nn.Module):
    """Lookups in the .bin's q8 table, sharing the codes with the tied output layer (an
    Int8Linear). Rows are codes * the file's fp32 row scale: exactly the stored values."""
    lean_decode = True

    def __init__(self, head: Int8Linear, scales: torch.Tensor, dtype):
        super().__init__()
        self.register_buffer("weight", head.weight)
        self.register_buffer("scales", scales.to(head.weight.device, torch.float32))
        self.cols, self.out_dtype = head.in_features, dtype

    def forward(self, idx):
        rows = self.weight[idx, :self.cols].to(torch.float32) * self.scales[idx].unsqueeze(-1)
        return rows.to(self.out_dtype)


# (block, split) candidates for the CPU int4 layout: AVX512 packs output rows in blocks of 64,
# AVX2 and the plain build in blocks of 32 (torch's int4mm_kernel.cpp); checked, never assumed
_INT4_CPU_LAYOUTS = ((64, True), (32, True), (32, False), (64, False))


def _int4_cpu_index(rows: torch.Tensor, n: int, k: int, block: int, split: bool) -> tuple:
    """Where some rows' codes sit in a _convert_weight_to_int4pack_for_cpu (n, k/2) uint8 tensor:
    (byte of column 0, bytes from one column to the next, nibble shift) per row. Its rows come in
    blocks of `block`, column after column; in a full block byte j of a column holds rows j (low
    nibble) and j + block/2 (high) when `split`, else rows 2j and 2j + 1 (as a shorter last block
    always does)."""
    half = block // 2
    b, r = rows // block, rows % block
    full = (b + 1) * block <= n
    pairs = ~full if split else torch.ones_like(full)
    off = torch.where(pairs, r // 2, r % half)
    shift = torch.where(pairs, r % 2, r // half) * 4
    stride = torch.where(full, half, (n - b * block) // 2)
    return (b * block * (k // 2) + off).to(torch.int32), stride.to(torch.int32), shift.to(torch.int32)


def _int4_cpu_codes(packed: torch.Tensor, start, stride, shift) -> torch.Tensor:
    """Codes (rows, k) at the positions _int4_cpu_index gives."""
    cols = torch.arange(packed.shape[1] * 2, device=packed.device)
    idx = start.long().unsqueeze(1) + cols * stride.long().unsqueeze(1)
    return (packed.view(-1)[idx].to(torch.int32) >> shift.unsqueeze(1)) & 15


def _find_int4_layout(packed: torch.Tensor, codes: torch.Tensor) -> tuple | None:
    """The (block, split) layout that gives back `codes` at the first and last 128 rows, or None."""
    n, k = codes.shape
    rows = torch.unique(torch.cat([torch.arange(min(n, 128)), torch.arange(max(0, n - 128), n)]))
    want = codes[rows].to(torch.int32)
    for layout in _INT4_CPU_LAYOUTS:
        index = _int4_cpu_index(rows, n, packed.shape[1] * 2, *layout)
        if torch.equal(_int4_cpu_codes(packed.cpu(), *index)[:, :k], want):
            return layout
    return None


class Int4Embedding(torch.nn.Module):
    """Lookups in the .bin's q4 table. The codes are read from the tied output layer's own tensor:
    in the CPU kernel's layout through a per-row position table (7 bytes a row, instead of a second
    copy of the codes), or row-packed when the head dequantizes per call. CUDA's tiled layout (or a
    CPU layout this code does not know) gets a row-packed copy. Scales and zero points are the
    file's, in fp32: rows are exactly the stored values."""
    lean_decode = True

    def __init__(self, qt: QTensor, head: Int4Linear, dtype):
        super().__init__()
        device = head.weight.device
        self.cols, self.group_size, self.out_dtype = qt.shape[1], qt.group_size, dtype
        layout = _find_int4_layout(head.weight, qt.codes) if head.mode == "cpu" else None
        self.row_packed = layout is None
        if layout is not None:
            index = _int4_cpu_index(torch.arange(qt.shape[0]), qt.shape[0], head.weight.shape[1] * 2, *layout)
            for name, t, dt in zip(("start", "stride", "shift"), index, (torch.int32, torch.int16, torch.uint8)):
                self.register_buffer(name, t.to(device, dt))
        shared = head.mode == "dequant" or layout is not None
        self.register_buffer("weight", head.weight if shared else _pack_rows(qt.codes).to(device))
        self.register_buffer("scales", qt.scales.to(device, torch.float32))
        self.register_buffer("zeros", qt.zeros.to(device, torch.float32))

    def forward(self, idx):
        flat = idx.reshape(-1)
        if self.row_packed:
            codes = _unpack_rows(self.weight[flat], self.cols)
        else:
            codes = _int4_cpu_codes(self.weight, self.start[flat], self.stride[flat],
                                    self.shift[flat].to(torch.int32))[:, :self.cols]
        rows = _dequant_rows(codes, self.scales[flat], self.zeros[flat], self.group_size, torch.float32)
        return rows.to(self.out_dtype).view(*idx.shape, self.cols)


def _runtime_linear(qt: QTensor, device, dtype) -> torch.nn.Module:
    """The layer that runs one stored matmul weight as it is stored."""
    if qt.qtype == "q8":
        return int8_linear(qt.codes, qt.scales, device)
    if qt.qtype == "q4":
        return int4_linear(qt, device)
    if qt.qtype == "f16" and dtype != torch.float16:
        return HalfLinear(qt.codes.to(device))
    linear = torch.nn.Linear(qt.shape[1], qt.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(qt.dequantize().to(device, dtype))
    return linear


def _runtime_embedding(qt: QTensor, device, dtype) -> tuple:
    """(tok_emb, lm_head) for the stored tied embedding; lm_head None = the stock tied output
    (F.linear on tok_emb.weight). An int8/int4 table is both the lookup and the head (one copy).
    An fp16 table serves the lookups; the head is an int8 copy of it (per-row, as q8): the fp16
    head is slow on CPU (batch 1: 1647 us vs 730 us int8 for small's 32000x512; batch 8: 13065
    vs 2810; see the table above) and the int8 copy adds vocab x d bytes, within the 1.5x-file
    memory budget for every strategy."""
    if qt.qtype == "q8":
        head = int8_linear(qt.codes, qt.scales, device)
        return Int8Embedding(head, qt.scales, dtype), head
    if qt.qtype == "q4":
        head = int4_linear(qt, device)
        return Int4Embedding(qt, head, dtype), head
    if qt.qtype == "f16" and dtype != torch.float16:
        return HalfEmbedding(qt.codes.to(device), dtype), int8_from_float(qt.codes, device, "tok_emb.weight")
    # from_pretrained: no init of its own (nn.Embedding's would import torch._dynamo on meta)
    return torch.nn.Embedding.from_pretrained(qt.dequantize().to(device, dtype), freeze=False), None


def _stack_rows(qts: list) -> QTensor | None:
    """Several q8 (or q4, one group size) tensors of the same row length stacked by rows; None
    when they differ in kind."""
    first = qts[0]
    if first.qtype not in ("q8", "q4") or any((q.qtype, q.group_size, q.shape[1]) !=
                                              (first.qtype, first.group_size, first.shape[1]) for q in qts):
        return None
    cat = {k: torch.cat([getattr(q, k) for q in qts]) if getattr(first, k) is not None else None
           for k in ("codes", "scales", "zeros")}
    return QTensor(first.qtype, (sum(q.shape[0] for q in qts), first.shape[1]), group_size=first.group_size, **cat)


def _fuse(parent: torch.nn.Module, names: tuple, qts: list, device, dtype) -> None:
    """One layer for the parent's `names` linears side by side (q/k/v, gate/up), set as
    parent.fused_<names> for model.GPT's fast decode step (one kernel call instead of several),
    with the parts re-made as row slices of its tensors (no second copy of the codes). Left as they
    are when the kinds differ or a slice of the kernel layout is not the part's own packing."""
    stacked = _stack_rows(qts)
    if stacked is None:
        return
    fused = _runtime_linear(stacked, device, dtype)
    parts, start = [], 0
    for name, qt in zip(names, qts):
        part = fused.rows(start, start + qt.shape[0])
        start += qt.shape[0]
        alone = dict(getattr(parent, name).named_buffers())
        if alone.keys() != dict(part.named_buffers()).keys() or not all(
                torch.equal(t, alone[k]) for k, t in part.named_buffers()):
            return
        parts.append(part)
    for name, part in zip(names, parts):
        setattr(parent, name, part)
    setattr(parent, "fused_" + "_".join(names), fused)


def install_runtime_layers(gpt, tensors: dict, device, dtype):
    """A GPT that runs the stored tensors as they are, with no float copy of a quantized weight:
    q8 -> Int8Linear, q4 -> Int4Linear, f16 -> HalfLinear (nn.Linear when dtype is fp16), f32 ->
    nn.Linear; q/k/v and gate/up of one kind also fused (_fuse); the tied embedding and head from
    _runtime_embedding; norms and RoPE tables in dtype. Built on the meta device, so the float
    model is never allocated: `gpt` is a model.GPT made on the meta device, filled here (this module
    sits below model.py and knows the GPT only by its parameter names)."""
    for name, module in list(gpt.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, attr = name.rsplit(".", 1)
            setattr(gpt.get_submodule(parent), attr, _runtime_linear(tensors[name + ".weight"], device, dtype))
        elif name.endswith("norm"):  # the RMSNorm gains: 1-D, kept in the model dtype
            module.weight = torch.nn.Parameter(tensors[name + ".weight"].dequantize().to(device, dtype))
    for i, block in enumerate(gpt.layers):
        for parent, names in ((block.attn, ("wq", "wk", "wv")), (block.mlp, ("w_gate", "w_up"))):
            prefix = f"layers.{i}.{'attn' if parent is block.attn else 'mlp'}"
            _fuse(parent, names, [tensors[f"{prefix}.{n}.weight"] for n in names], device, dtype)
    gpt.tok_emb, gpt.lm_head = _runtime_embedding(tensors["tok_emb.weight"], device, dtype)
    gpt.rope_cos, gpt.rope_sin = gpt.rope_cos.to(device, dtype), gpt.rope_sin.to(device, dtype)
    left = [n for n, t in itertools.chain(gpt.named_parameters(), gpt.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"install_runtime_layers left tensors unset: {left[:3]}")
    return gpt


# -----------------------------------------------------------------------------
# Checkpoints


def unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _atomic_torch_save(obj, path: Path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, model, *, tokenizer=None, optimizer=None, scheduler=None, scaler=None, step=0,
                    best_val_loss=None, rng_state=None, data_state=None, train_args=None, extra=None):
    m = unwrap(model)
    if tokenizer is None:
        tokenizer = m.tokenizer
    if tokenizer is not None and hasattr(tokenizer, "to_dict"):
        tokenizer = tokenizer.to_dict()
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": m.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else scheduler,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "step": int(step),
        "best_val_loss": None if best_val_loss is None else float(best_val_loss),
        "rng": rng_state,
        "data_state": data_state,
        "train_args": train_args,
        "tokenizer": tokenizer,
        "extra": extra,
    }
    _atomic_torch_save(ckpt, Path(path))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and validate a FishAI checkpoint with torch.load(weights_only=True): a file
    carrying pickled code is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (train.py writes checkpoints/fishai-best.pt; check the path)")
    kind = file_kind(path)
    if kind not in (None, "zip", "checkpoint"):  # one of the project's other files: say which, and what takes it
        raise CheckpointError(f"{describe(path, kind)}; a checkpoint is the .pt file train.py writes")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is foreign or cut short
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not a file written by torch.save)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: the file holds Python objects that safe loading does not allow "
                              f"(not a FishAI checkpoint, or an unsafe pickle): {str(e).splitlines()[0]}") from None
    except Exception as e:  # zip/EOF/unpickler errors of a truncated or foreign file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not a torch file): {msg}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a FishAI checkpoint (no '{CHECKPOINT_FORMAT}' format tag); "
                              f"for HF models pass the directory, for exports the quantize.py .bin")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this FishAI Train "
                              f"supports ({CHECKPOINT_VERSION}): update FishAI Train")
    for key in ("config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint is missing its '{key}' entry (corrupted?)")
    return ckpt


def load_state_checked(model: GPT, state: dict, source="checkpoint"):
    """load_state_dict with an error that names the first mismatching tensor."""
    own = model.state_dict()
    for name, t in own.items():
        if name not in state:
            raise CheckpointError(f"{source}: tensor '{name}' is missing (config/state mismatch)")
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                                  f"the config expects {tuple(t.shape)} (config/state mismatch)")
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor '{extra[0]}' (config/state mismatch)")
    model.load_state_dict(state)


def chat_training_warning(model) -> str | None:
    """The warning --chat prints for a model that was never chat-trained (None after SFT). The
    stage comes from the file: train.py records it in checkpoints, and quantize.py's exports (.bin,
    HF directory) carry it over (model.load_model sets model.stage)."""
    stage = getattr(model, "stage", None)
    if stage == "sft":
        return None
    name = getattr(model, "source", None) or "the model"
    why = (f"its checkpoint records training stage '{stage}'" if stage else
           "it records no training stage (an older checkpoint, or a file made elsewhere)")
    return (f"{name} may not be chat-trained: {why}; a model follows the chat template only after "
            f"fine-tuning (python train.py --stage sft --init-from CHECKPOINT --data chat.jsonl)")


def checkpoint_stage(ckpt: dict) -> str | None:
    """The training stage a checkpoint records (train.py's --stage), or None."""
    for key in ("extra", "train_args"):
        entry = ckpt.get(key)
        if isinstance(entry, dict) and entry.get("stage"):
            return str(entry["stage"])
    return None


def _tokenizer_from(data):
    return TextTokenizer.from_dict(data) if data else None


def load_quantized(path, device="cpu", dtype=None, dequantize: bool = False) -> GPT:
    """A quantize.py .bin (read_quantized) as a GPT in eval mode with .tokenizer and
    .stage from its header: on its int8/int4 layers (install_runtime_layers, built on the
    meta device: about the memory of the file) or, with dequantize=True, with plain float weights
    (for training, export and as the reference of the quantized layers). dtype: the activation
    dtype and that of float weights (None: float32)."""
    header, tensors = read_quantized(path)
    try:
        config = ModelConfig.from_dict(header["model_config"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: bad model config in header ({err})") from None
    shapes = param_shapes(config)
    missing = [n for n in shapes if n not in tensors]
    unexpected = [n for n in tensors if n not in shapes]
    wrong = [n for n, qt in tensors.items() if n in shapes and tuple(qt.shape) != tuple(shapes[n])]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: tensors do not match the model config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    device, dtype = torch.device(device), resolve_dtype(dtype, device) or torch.float32
    if dequantize:
        gpt = GPT(config)
        gpt.load_state_dict({name: qt.dequantize() for name, qt in tensors.items()}, strict=False)
        gpt = gpt.to(device=device, dtype=dtype)
    else:
        with torch.device("meta"):
            gpt = GPT(config)
        install_runtime_layers(gpt, tensors, device, dtype)
    del tensors
    release_freed_memory()
    gpt.tokenizer = _tokenizer_from(header.get("tokenizer"))
    gpt.stage = header.get("stage")  # the training stage of the source checkpoint (generate.py --chat)
    gpt.quantized_from = header.get("strategy") or "quantized"
    return gpt.eval()


def load_model(path, device="cpu", dtype=None, dequantize: bool = False) -> GPT:
    """One entry point for every model file: a training checkpoint (.pt), a quantize.py export
    (.bin) or an HF Llama directory. Returns a GPT in eval mode with .tokenizer attached.
    A .bin runs quantized (int8/int4 kernels, about the memory of the file;
    install_runtime_layers) unless dequantize=True, which gives plain float weights (for training,
    export or comparison). dtype is the activation dtype then (None: float32)."""
    path = Path(path)
    kind = check_model_path(path)  # a GGUF, a token file, a run folder...: what it is and what takes it
    device = resolve_device(device)  # "auto", "cuda" (indexed), a torch.device
    dtype = resolve_dtype(dtype, device)
    if kind == "hf_model":
        model = from_hf(path, device=device)
    else:
        if kind == "quantized":
            model = load_quantized(path, device=device, dtype=dtype, dequantize=dequantize)
            model.source = str(path)
            return model.eval()
        ckpt = load_checkpoint(path)
        try:
            config = ModelConfig.from_dict(ckpt["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad model config in checkpoint: {e}") from None
        model = GPT(config)
        load_state_checked(model, ckpt["model"], source=str(path))
        model.tokenizer = _tokenizer_from(ckpt.get("tokenizer"))
        model.stage = checkpoint_stage(ckpt)
    model.source = str(path)
    return model.to(device=device, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# Hugging Face interop (transformers.LlamaForCausalLM, tied embeddings)

# our tensor name -> (its transformers LlamaForCausalLM name, its llama.cpp GGUF name); the layer
# tensors are "layers.{i}.<key>" on our side. One table, so the HF and GGUF exports cannot drift apart.
_TENSOR_NAMES = {
    "tok_emb.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "attn_norm.weight": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "attn.wq.weight": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "attn.wk.weight": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "attn.wv.weight": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "attn.wo.weight": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "mlp.w_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "mlp.w_up.weight": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "mlp.w_down.weight": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
}


def external_name(name: str, fmt: str = "hf") -> str:
    """Our tensor name -> the name transformers ("hf") or llama.cpp ("gguf") gives it."""
    i, key = (name.split(".", 2)[1:] if name.startswith("layers.") else (None, name))
    return _TENSOR_NAMES[key][0 if fmt == "hf" else 1].format(i=i)


def hf_name(name: str) -> str:
    """Our tensor name -> the LlamaForCausalLM one."""
    return external_name(name, "hf")


def hf_config(config: ModelConfig, tokenizer=None):
    from transformers import LlamaConfig
    eos = tokenizer.eos_id if tokenizer is not None else 0
    pad = getattr(tokenizer, "pad_id", None) if tokenizer is not None else None
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
                       num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                       num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
                       max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                       rope_theta=config.rope_theta, hidden_act="silu", tie_word_embeddings=True,
                       attention_bias=False, mlp_bias=False, initializer_range=config.init_std,
                       bos_token_id=None, eos_token_id=eos, pad_token_id=pad)


def to_hf(model):
    """A transformers.LlamaForCausalLM with the same weights (and so the same logits)."""
    from transformers import LlamaForCausalLM
    m = unwrap(model)
    weight = m.tok_emb.weight
    cfg = hf_config(m.config, m.tokenizer)
    if getattr(m, "stage", None):
        cfg.fishai_stage = m.stage  # kept in config.json, so generate.py knows a chat-trained model
    hf = LlamaForCausalLM(cfg).to(device=weight.device, dtype=weight.dtype)
    state = {hf_name(k): v for k, v in m.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    return hf.eval()


def _rope_theta(cfg):
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default" or getattr(cfg, "rope_scaling", None):
        rs = params if params.get("rope_type", "default") != "default" else cfg.rope_scaling
        if (rs or {}).get("rope_type", (rs or {}).get("type", "default")) != "default":
            raise CheckpointError(f"RoPE scaling {rs} is not supported by the FishAI GPT")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def from_hf(model_or_dir, device="cpu") -> GPT:
    """A GPT from a LlamaForCausalLM (object, local directory or hub name)."""
    from transformers import LlamaForCausalLM
    tokenizer = None
    if isinstance(model_or_dir, (str, Path)):
        src = str(model_or_dir)
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar for a model this small
        try:
            hf = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
        except OSError as e:
            raise CheckpointError(f"{src}: cannot load the HF model (offline, or not a Llama directory): "
                                  f"{str(e).splitlines()[0]}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if Path(src).is_dir() and (Path(src) / "tokenizer.json").is_file():
            tokenizer = TextTokenizer.from_dir(src)
    else:
        hf, src = model_or_dir, "LlamaForCausalLM"
    c = hf.config
    if getattr(c, "model_type", "llama") != "llama":
        raise CheckpointError(f"{src}: model_type '{c.model_type}' is not llama; the FishAI GPT is a Llama")
    if not getattr(c, "tie_word_embeddings", False):
        raise CheckpointError(f"{src}: untied lm_head: the FishAI GPT always ties the embedding and the output")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise CheckpointError(f"{src}: biases are not supported by the FishAI GPT")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim != c.hidden_size // c.num_attention_heads:
        raise CheckpointError(f"{src}: head_dim {head_dim} != hidden_size / heads (unsupported)")
    config = ModelConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                         n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
                         d_ff=c.intermediate_size, max_seq_len=c.max_position_embeddings,
                         rope_theta=_rope_theta(c), norm_eps=c.rms_norm_eps,
                         init_std=getattr(c, "initializer_range", 0.02))
    model = GPT(config)
    hf_state = hf.state_dict()
    state = {k: hf_state[hf_name(k)].float() for k in model.state_dict()}
    load_state_checked(model, state, source=src)
    model.tokenizer = tokenizer
    model.stage = getattr(c, "fishai_stage", None)
    return model.to(device).eval()


def is_hf_output(name: str) -> bool:
    """Whether a file name is one save_hf writes (so --overwrite may replace it)."""
    return (name in ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                     "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja")
            or (name.startswith("model-") and name.endswith(".safetensors")))


def save_hf(model, out_dir, tokenizer=None, overwrite=False, model_card: str | None = None):
    """Write an HF Llama directory (config.json, model.safetensors, tokenizer files and, when
    given, the model card as README.md), built in a temp dir beside out_dir and swapped into place
    (data_utils.atomic_dir: an existing directory is only replaced with overwrite=True, when it
    holds nothing but what save_hf writes, and only once the new one is complete)."""
    m = unwrap(model)
    tokenizer = tokenizer or m.tokenizer
    with atomic_dir(out_dir, overwrite, flag="--output", owns=is_hf_output, what="an HF model directory") as tmp:
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar for one small file
        try:
            to_hf(m).save_pretrained(tmp, safe_serialization=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if tokenizer is not None:
            tokenizer.save(tmp)
        if model_card:
            atomic_write_text(tmp / "README.md", model_card)
    return Path(out_dir)


# -----------------------------------------------------------------------------
# Size table (README's model table comes from here)


def model_bytes(model) -> int:
    """Bytes held by a model's parameters and buffers, each storage counted once (tied or shared
    tensors; a KV cache when one is allocated): what a loaded model costs in memory."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def int4_bytes(config: ModelConfig, group_size=128) -> int:
    """Bytes of the weights as INT4 (two per byte) with an fp16 scale and zero point per group;
    norm gains in fp16. The file header adds a few KB."""
    total = 0
    for name, shape in param_shapes(config).items():
        numel = math.prod(shape)
        if len(shape) == 1:
            total += 2 * numel
        else:
            rows, cols = shape
            total += rows * ((cols + 1) // 2) + rows * math.ceil(cols / group_size) * 4
    return total


def param_shapes(config: ModelConfig) -> dict:
    d, hd = config.d_model, config.head_dim
    shapes = {"tok_emb.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "attn.wq.weight": (config.n_heads * hd, d),
                       p + "attn.wk.weight": (config.n_kv_heads * hd, d),
                       p + "attn.wv.weight": (config.n_kv_heads * hd, d),
                       p + "attn.wo.weight": (d, config.n_heads * hd), p + "mlp_norm.weight": (d,),
                       p + "mlp.w_gate.weight": (config.d_ff, d), p + "mlp.w_up.weight": (config.d_ff, d),
                       p + "mlp.w_down.weight": (d, config.d_ff)})
    shapes["norm.weight"] = (d,)
    return shapes


def size_table(names=None) -> list[dict]:
    rows = []
    for name in names or CONFIGS:
        c = CONFIGS[name]
        n = count_params(c)
        rows.append({"config": name, "d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads,
                     "n_kv_heads": c.n_kv_heads, "d_ff": c.d_ff, "vocab_size": c.vocab_size,
                     "max_seq_len": c.max_seq_len, "params": n,
                     "non_embedding_params": n - c.vocab_size * c.d_model,
                     "fp32_mb": n * 4 / 1e6, "fp16_mb": n * 2 / 1e6, "int4_g128_mb": int4_bytes(c) / 1e6,
                     "train_flops_per_token": estimate_flops_per_token(c, c.max_seq_len)})
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_cli(print_size_table, args)


def output_plan(args) -> tuple[list, list]:
    """What print_size_table writes (--json) and reads (nothing)."""
    return [common.Output(args.json, "--json", "json")], []


def print_size_table(args) -> None:
    common.check_plan(*output_plan(args), args.overwrite)
    rows = size_table([args.config] if args.config else None)
    print(f"{'config':<8}{'d_model':>8}{'layers':>7}{'heads':>6}{'kv':>4}{'d_ff':>6}{'vocab':>7}"
          f"{'params':>14}{'FP32 MB':>10}{'FP16 MB':>10}{'INT4 MB':>10}")
    for r in rows:
        print(f"{r['config']:<8}{r['d_model']:>8}{r['n_layers']:>7}{r['n_heads']:>6}{r['n_kv_heads']:>4}"
              f"{r['d_ff']:>6}{r['vocab_size']:>7}{r['params']:>14,}{r['fp32_mb']:>10.1f}{r['fp16_mb']:>10.1f}"
              f"{r['int4_g128_mb']:>10.1f}")
    if args.config:
        for name, shape in param_shapes(CONFIGS[args.config]).items():
            if name.startswith("layers.") and not name.startswith("layers.0."):
                continue
            print(f"  {name:<32} {str(shape):>14} {math.prod(shape):>12,}")
        print(f"  (layers.1 .. layers.{CONFIGS[args.config].n_layers - 1} repeat layers.0)")
    if args.json:
        common.write_json(args.json, rows)


if __name__ == "__main__":
    sys.exit(main())
