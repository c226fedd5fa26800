"""
FishAI GPT: one LLaMA-3-style decoder in one file.

RoPE (one shared cos/sin table), SwiGLU MLP, pre-norm RMSNorm, grouped-query attention
through torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA),
tied input/output embedding, no biases, a pre-allocated KV cache for decoding. The weight
layout equals transformers.LlamaForCausalLM (tie_word_embeddings=True), so conversion in
both directions is a renaming of tensors.

Also here: the presets, checkpoint I/O (atomic, weights_only-loadable), the one loader that
every script uses (`load_model`: .pt checkpoint, quantized .bin, HF Llama directory), HF
conversion, the optimizer parameter groups and the FLOPs/MFU helpers.

Usage:
    python model.py                          # table of presets: true parameter counts and sizes
    python model.py --config small           # one preset, with a per-tensor breakdown
    python model.py --json sizes.json        # the same table as JSON
"""

from __future__ import annotations

import contextlib
import gc
import math
import pickle
import sys
import zipfile
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import common
from common import CheckpointError, atomic_dir, atomic_write, atomic_write_text, resolve_device, resolve_dtype
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

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import quantized  # noqa: E402  (the .bin format and its int8/int4 layers; imports torch)
from quantized import QUANT_MAGIC  # noqa: E402

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
                k, v = k[:, :, :kv_end], v[:, :, :kv_end]
            elif kv_end is not None:  # eager decoding: attend only to the filled part of the cache
                k, v = self.kv_cache.update(input_pos, k, v, start=kv_end - T)
                k, v = k[:, :, :kv_end], v[:, :, :kv_end]
            else:
                k, v = self.kv_cache.update(input_pos, k, v)
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
        # built under `with torch.device("meta")` (quantized.install_runtime_layers) there is nothing to
        # initialize, and nn.Embedding's own init of a meta tensor would import torch._dynamo (seconds)
        meta = torch.empty(0).is_meta
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model,
                                    _weight=torch.empty(config.vocab_size, config.d_model) if meta else None)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # the output layer is tied to tok_emb (F.linear on its weight); a quantized model loaded
        # from a .bin sets its own module here (quantized.install_runtime_layers)
        self.lm_head = None
        with torch.device("cpu") if meta else contextlib.nullcontext():  # (arange on meta: the same import)
            cos, sin = rope_tables(config, config.max_seq_len)
        # one table shared by all layers; not saved (derived from the config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.tokenizer = None
        self.stage = None  # the training stage train.py recorded ("pretrain" / "sft"); exports carry it
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
            if p.is_meta:  # no values to fill (quantized.install_runtime_layers builds on the meta device)
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
            # quantized.install_runtime_layers fused them (parent.fused_<names>), else one call each
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
    """A quantize.py .bin (quantized.read_quantized) as a GPT in eval mode with .tokenizer and
    .stage from its header: on its int8/int4 layers (quantized.install_runtime_layers, built on the
    meta device: about the memory of the file) or, with dequantize=True, with plain float weights
    (for training, export and as the reference of the quantized layers). dtype: the activation
    dtype and that of float weights (None: float32)."""
    header, tensors = quantized.read_quantized(path)
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
        quantized.install_runtime_layers(gpt, tensors, device, dtype)
    del tensors
    quantized.release_freed_memory()
    gpt.tokenizer = _tokenizer_from(header.get("tokenizer"))
    gpt.stage = header.get("stage")  # the training stage of the source checkpoint (generate.py --chat)
    return gpt.eval()


def load_model(path, device="cpu", dtype=None, dequantize: bool = False) -> GPT:
    """One entry point for every model file: a training checkpoint (.pt), a quantize.py export
    (.bin) or an HF Llama directory. Returns a GPT in eval mode with .tokenizer attached.
    A .bin runs quantized (int8/int4 kernels, about the memory of the file;
    quantized.install_runtime_layers) unless dequantize=True, which gives plain float weights (for training,
    export or comparison). dtype is the activation dtype then (None: float32)."""
    path = Path(path)
    device = resolve_device(device)  # "auto", "cuda" (indexed), a torch.device
    dtype = resolve_dtype(dtype, device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a directory without config.json is not an HF model directory")
        model = from_hf(path, device=device)
    else:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file (check the path)")
        with open(path, "rb") as f:
            head = f.read(len(QUANT_MAGIC))
        if head == QUANT_MAGIC:
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


def print_size_table(args) -> None:
    common.check_new_file(args.json, "--json", args.overwrite)
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
