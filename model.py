"""
FishAI GPT: one LLaMA-3-style decoder in one file.

RoPE (one shared cos/sin table), SwiGLU MLP, pre-norm RMSNorm, grouped-query attention
through torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA),
tied input/output embedding, no biases. The weight layout equals
transformers.LlamaForCausalLM (tie_word_embeddings=True), so conversion in both directions is
a renaming of tensors. GPT holds construction, the training forward and the loss; decoding
with a KV cache is engine.py's, the quantized .bin and its int8/int4 layers quantized.py's.

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
import math
import pickle
import sys
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from common import (IGNORE_INDEX, CheckpointError, atomic_dir, atomic_write, atomic_write_text, check_model_path,
                    describe, file_kind, resolve_device, resolve_dtype)
from quantized import install_runtime_layers, read_quantized, release_freed_memory
from text_tokenizer import TextTokenizer

def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(description="FishAI GPT presets: true parameter counts and sizes.")
    p.add_argument("--config", choices=tuple(CONFIGS), help="show one preset with its tensors (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    common.add_overwrite_flag(p, "an existing --json file")
    return p


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d = config.d_model
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, is_causal):
        B, T, _ = x.shape
        # module calls (not F.linear on the weights) so that hooks and swapped-in layers (GPTQ
        # calibration, LoRA) see every matmul
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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

    def forward(self, x, cos, sin, mask, is_causal):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal)
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

    # --- forward ------------------------------------------------------------------

    def _hidden(self, idx, doc_ids=None):
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.tok_emb(idx)
        mask, is_causal = None, False
        if doc_ids is not None:
            pos = positions_from_doc_ids(doc_ids)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)
        else:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            is_causal = True
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal)
        return self.norm(x)

    def forward(self, idx, targets=None, loss_mask=None, doc_ids=None, return_logits=None):
        """Returns (logits, loss). With targets the logits are skipped unless return_logits=True:
        the loss is averaged over positions whose target is not IGNORE_INDEX and, when given,
        whose loss_mask is 1. doc_ids (B, T): packed documents attend within their own document
        (positions restart at each). Decoding with a KV cache is engine.py's."""
        h = self._hidden(idx, doc_ids=doc_ids)
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

# -----------------------------------------------------------------------------
# FLOPs and MFU (the optimizers: optim.py)


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
    (common.atomic_dir: an existing directory is only replaced with overwrite=True, when it
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
