"""
Quantized export of a FishAI model: one self-describing binary (docs/FORMAT.md), a
Hugging Face LlamaForCausalLM directory (with a model card), or a llama-architecture GGUF file.

Usage (copy-paste):

    # the seed's export: FP16 embedding/norms, INT8 Q/K, INT4 group-128 V/O/FFN
    python quantize.py --model checkpoints/fishai-best.pt --output fishai-small-mixed.bin --strategy mixed

    # all matmul weights + tied embedding INT4 (group 128), with bits/byte and perplexity before/after
    python quantize.py --model checkpoints/fishai-best.pt --output fishai-small-int4.bin --strategy int4 \
        --eval-data wikitext103 --limit 50 --json int4.json

    # GPTQ-style error-compensating quantization from calibration text
    python quantize.py --model checkpoints/fishai-best.pt --output fishai-small-int4-gptq.bin --strategy int4 \
        --calibration-data data/raw/train.txt --calibration-samples 128

    # Hugging Face directory (LlamaForCausalLM, FP16, README.md model card) and GGUF for llama.cpp
    python quantize.py --model checkpoints/fishai-best.pt --output hf-fishai --format hf --strategy fp16
    python quantize.py --model checkpoints/fishai-best.pt --output fishai.gguf --format gguf --strategy mixed

An existing output is only replaced with --overwrite. The .bin file loads anywhere a model is
accepted: `model.load_model("fishai-small-int4.bin")` (benchmark.py, evaluate.py, generate.py), and
runs quantized: int8/int4 layers on torch's int8/int4 kernels (the memory of the file, about 3x
faster batch-1 decoding than fp32 on CPU; see "Running quantized" below and docs/FORMAT.md).
`load_model(path, dequantize=True)` (`--dequantize` in benchmark.py full, evaluate.py and generate.py)
gives plain float weights instead.

Strategies (2-D matmul weights and the tied embedding; 1-D RMSNorm gammas are always FP16):
    fp32   lossless reference (FP32 everywhere)
    fp16   everything FP16
    int8   per-output-row symmetric INT8 (fp16 scale per row) for every matmul weight and the embedding
    int4   asymmetric INT4, per group of --group-size elements along each row (fp16 scale + zero point),
           for every matmul weight AND the tied embedding
    mixed  embedding FP16; wq/wk INT8; wv/wo/w_gate/w_up/w_down INT4
Rows whose length is not a multiple of the group size end with one shorter group (no padding values
are stored; see docs/FORMAT.md).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import itertools
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import data_utils as du

STRATEGIES = ("fp32", "fp16", "int8", "int4", "mixed")
FORMATS = ("bin", "hf", "gguf")
DEFAULT_GROUP_SIZE = 128


def build_parser() -> du.ArgumentParser:
    p = du.ArgumentParser(
        description="Export a FishAI checkpoint as a quantized .bin (docs/FORMAT.md), an HF Llama directory\n"
                    "(with a README.md model card) or a GGUF file, and report size and quality.")
    p.add_argument("--model", default="checkpoints/fishai-best.pt",
                   help="source model: a .pt checkpoint (or anything model.load_model reads); "
                        "default checkpoints/fishai-best.pt, what train.py writes")
    p.add_argument("--output", default=None, help="output .bin / .gguf file, or directory for --format hf "
                   "(default fishai-<strategy>.bin / .gguf, or fishai-hf/)")
    p.add_argument("--format", choices=FORMATS, default="bin", help="bin: FishAI quantized file; hf: "
                   "LlamaForCausalLM directory; gguf: llama.cpp file")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="precision plan (default: mixed for bin/gguf, fp16 for hf; hf accepts fp16/fp32)")
    p.add_argument("--group-size", type=du.int_flag(1), default=DEFAULT_GROUP_SIZE,
                   help="INT4 elements per scale/zero-point group along each row "
                        "(.bin; GGUF Q4_0 always uses blocks of 32)")
    p.add_argument("--calibration-data", metavar="PATH", default=None,
                   help="text for GPTQ-style error-compensating quantization (txt/jsonl/parquet/dir/hf:NAME); "
                        "default: round-to-nearest")
    p.add_argument("--calibration-samples", type=du.int_flag(1), default=128, help="calibration windows")
    p.add_argument("--calibration-seq-len", type=du.int_flag(1), default=None,
                   help="tokens per calibration window (default: min(512, model max_seq_len))")
    p.add_argument("--damp", type=du.float_flag(0, lo_open=True), default=0.01,
                   help="GPTQ dampening, fraction of mean diag(H)")
    p.add_argument("--eval-data", default=None, help="bits/byte and perplexity before/after on this text: "
                   "wikitext103, wikitext2 or ptb (HF download), NAME:PATH for a local copy (e.g. "
                   "wikitext103:../shared/data/wikitext103), a wiki.*.tokens file, or a txt/jsonl/parquet path")
    p.add_argument("--limit", type=du.int_flag(1), default=None,
                   help="use only the first N --eval-data documents (default: all)")
    p.add_argument("--eval-limit", dest="limit", type=du.int_flag(1), help=argparse.SUPPRESS)
    p.add_argument("--eval-batch-size", type=du.int_flag(1), default=8, help="windows per scoring batch")
    p.add_argument("--seed", type=du.int_flag(0), default=0, help="calibration window sampling seed (default: 0)")
    du.add_overwrite_flag(p, "an existing --output (and --json) file or directory")
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    du.add_quiet_flag(p)
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import benchmark  # noqa: E402
import model as fishai  # noqa: E402

FORMAT_NAME = "fishai-quantized"
FORMAT_VERSION = 1
ALIGN = 64                                      # payload parts start on 64-byte boundaries (mmap/SIMD friendly)
PREAMBLE = struct.Struct("<8sIIQQ")             # magic (model.QUANT_MAGIC), version, flags, header_len, payload_len
CHECKSUM_LEN = 32                               # SHA-256 trailer
QTYPES = ("f32", "f16", "q8", "q4")
# Smallest positive fp16 value (subnormal): scales are stored in fp16, a zero scale would lose the row.
_FP16_TINY = 2.0 ** -24


class QuantizeError(du.FishAIError):
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
# Strategies

def plan_qtype(name: str, shape, strategy: str) -> str:
    """Quant type of one parameter under a strategy. 1-D tensors (RMSNorm gammas) stay FP16
    (FP32 under fp32): they are tiny and every activation passes through them."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    if strategy == "fp32":
        return "f32"
    if len(shape) != 2 or strategy == "fp16":
        return "f16"
    if strategy == "int8":
        return "q8"
    if strategy == "int4":
        return "q4"
    # mixed (the seed's table): embedding FP16, Q/K INT8 (attention logits are the most
    # sensitive to rounding), everything else INT4.
    if name == "tok_emb.weight":
        return "f16"
    if name.endswith("attn.wq.weight") or name.endswith("attn.wk.weight"):
        return "q8"
    return "q4"


def quant_error(w: torch.Tensor, deq: torch.Tensor) -> dict:
    w = w.float()
    diff = (deq.float() - w).abs()
    denom = w.norm().item()
    return {"max_abs_err": diff.max().item() if diff.numel() else 0.0,
            "mean_abs_err": diff.mean().item() if diff.numel() else 0.0,
            "rel_err": (diff.norm().item() / denom) if denom > 0 else 0.0}


# ----------------------------------------------------------------------------------------------
# GPTQ-style calibrated quantization

class _Q8Grid:
    """GPTQ's INT8 grid: one scale per row, from the original weights."""

    def __init__(self, w: torch.Tensor, name: str):
        self.scales = int8_row_scales(w, name)

    def start_block(self, i1: int, block: torch.Tensor) -> None:
        pass  # the row scales cover every column

    def round(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int8_codes(col, self.scales)
        return c, c * self.scales.float()

    def qtensor(self, codes: torch.Tensor, shape: tuple) -> QTensor:
        return QTensor("q8", shape, codes.to(torch.int8), scales=self.scales, method="gptq")


class _Q4Grid:
    """GPTQ's INT4 grid: a group's scale and zero point are chosen when its first column is
    reached, from the weights as the earlier columns' error updates left them."""

    def __init__(self, rows: int, cols: int, group_size: int, name: str):
        ng = _n_groups(cols, group_size)
        self.scales = torch.zeros(rows, ng, dtype=torch.float16)
        self.zeros = torch.zeros(rows, ng, dtype=torch.float16)
        self.group_size, self.name, self.g = group_size, name, 0

    def start_block(self, i1: int, block: torch.Tensor) -> None:
        self.g = i1 // self.group_size
        self.scales[:, self.g], self.zeros[:, self.g] = int4_params(block, self.name)

    def round(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.scales[:, self.g], self.zeros[:, self.g]
        c = int4_codes(col, s, z)
        return c, (c - z.float()) * s.float()

    def qtensor(self, codes: torch.Tensor, shape: tuple) -> QTensor:
        return QTensor("q4", shape, codes.to(torch.uint8), scales=self.scales, zeros=self.zeros,
                       group_size=self.group_size, method="gptq")


def _inverse_hessian_factor(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, which GPTQ's column updates use. Dampening keeps H positive
    definite; it grows tenfold while Cholesky still fails (a rank-deficient H)."""
    base = damp * torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(H + base * (10 ** attempt) * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
        except RuntimeError:
            continue
    raise QuantizeError(f"{name}: calibration Hessian is not positive definite even with dampening; "
                        "give more or other --calibration-data, or a larger --damp")


def _gptq_sweep(W: torch.Tensor, Hinv: torch.Tensor, grid, block_size: int) -> torch.Tensor:
    """Quantize W's columns left to right on `grid`, spreading each column's rounding error over the
    columns not yet quantized (within a block at once, onto later blocks in one matmul). Returns codes."""
    rows, cols = W.shape
    codes = torch.zeros(rows, cols, dtype=torch.float32)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        grid.start_block(i1, W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            c, q = grid.round(col)
            codes[:, i1 + i] = c
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, qtype: str, group_size: int = DEFAULT_GROUP_SIZE,
                  damp: float = 0.01, block_size: int = 128, name: str = "tensor") -> QTensor:
    """Quantize W (out, in) column by column, spreading each column's rounding error over the not yet
    quantized columns through the inverse Hessian H = 2 X^T X / n of the layer inputs (GPTQ,
    Frantar et al. 2022, without act-order). q4 params are chosen per group when the group's first
    column is reached (from the already error-updated weights); q8 keeps one scale per row from the
    original weights. Returns the same QTensor layout as quantize_rtn."""
    if qtype not in ("q4", "q8"):
        return quantize_rtn(w, qtype, group_size, name)
    W = w.detach().float().cpu().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    H = H.detach().double().cpu().clone()
    dead = torch.diag(H) == 0                  # inputs that were always zero: weight is irrelevant
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_hessian_factor(H, damp, name)
    if qtype == "q8":
        grid = _Q8Grid(w.detach().float().cpu(), name)
    else:
        _check_group_size(group_size)
        grid = _Q4Grid(rows, cols, group_size, name)
        block_size = group_size                # blocks == groups: a group's params see all updates
    return grid.qtensor(_gptq_sweep(W, Hinv, grid, block_size), (rows, cols))


class _StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early (no logits needed)."""


def _accumulate_hessians(model, modules: dict, batches: list, stop_module):
    """H = 2/n sum x x^T over every input row x of each module. The forward pass stops after
    stop_module."""
    H, count, hooks = {}, {}, []

    def make_hook(key):
        def hook(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            if key not in H:
                H[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                count[key] = 0
            H[key] += 2.0 * x.T @ x
            count[key] += x.shape[0]
        return hook

    for key, mod in modules.items():
        hooks.append(mod.register_forward_hook(make_hook(key)))

    def stop(mod, inp, out):
        raise _StopForward

    hooks.append(stop_module.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(b)
                except _StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {k: H[k] / max(count[k], 1) for k in H}


def gptq_quantize_model(gpt, plan: dict, batches: list, group_size: int, damp: float = 0.01,
                        progress: bool = True) -> dict:
    """Sequential GPTQ over the transformer blocks: block i's Hessians are measured with blocks < i
    already quantized (so later layers compensate earlier error), then its linears are quantized.
    The tied embedding keeps round-to-nearest: GPTQ would tune it as the output head only, and the
    error it moves between columns then lands on every input embedding (measured on the test
    model: int4 perplexity +0.83% with a GPTQ'd embedding vs +0.53% RTN, on python-docs).
    Modifies a copy of the weights in place; returns {param name: QTensor} for the q4/q8 params."""
    out = {}
    module_names = {m: n for n, m in gpt.named_modules()}
    for blk in tqdm(list(gpt.layers), desc="gptq", unit="layer", disable=not progress):
        linears = {module_names[m] + ".weight": m for m in blk.modules() if isinstance(m, torch.nn.Linear)}
        linears = {pname: m for pname, m in linears.items() if plan.get(pname) in ("q4", "q8")}
        if not linears:
            continue
        Hs = _accumulate_hessians(gpt, linears, batches, blk)
        for pname, m in linears.items():
            qt = gptq_quantize(m.weight, Hs[pname], plan[pname], group_size, damp, name=pname)
            m.weight.data.copy_(qt.dequantize().to(m.weight.dtype))
            out[pname] = qt
    return out


def calibration_batches(tokenizer, source: str, n_samples: int, seq_len: int, batch_size: int = 8,
                        seed: int = 0, show_progress: bool = False) -> list:
    """n_samples random windows of seq_len tokens from the documents in source (any data_utils
    source: txt, jsonl, parquet, dir, glob, hf:NAME), tokenized by data_utils.tokenize_documents
    (documents joined with EOS, as prepare writes them)."""
    if tokenizer is None:
        raise QuantizeError("--calibration-data needs a tokenizer, and the checkpoint has none embedded")
    need = max(n_samples * seq_len * 2, seq_len + 1)     # enough text for non-overlapping windows
    ids = du.tokenize_documents(source, tokenizer, max_tokens=need, show_progress=show_progress)["train"]
    if len(ids) < seq_len + 1:
        raise QuantizeError(f"--calibration-data {source}: only {len(ids)} tokens, need at least {seq_len + 1}")
    data = torch.from_numpy(ids.astype(np.int64))
    n_windows = len(ids) // seq_len
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n_windows, generator=g)[:n_samples] * seq_len
    windows = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


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

        put(PREAMBLE.pack(fishai.QUANT_MAGIC, FORMAT_VERSION, 0, len(header_bytes), payload_len))
        put(header_bytes)
        put(b"\0" * (payload_start - PREAMBLE.size - len(header_bytes)))
        pos = 0
        for off, data in blobs:
            put(b"\0" * (off - pos))
            put(data)
            pos = off + len(data)
        f.write(h.digest())

    du.atomic_write(path, write)
    return payload_start + payload_len + CHECKSUM_LEN


def _check_layout(path: Path, raw: bytes, verify: bool) -> tuple[int, int, int]:
    """Validate the preamble, the size and the checksum in the order docs/FORMAT.md gives.
    Returns (header_len, payload_start, payload_len)."""
    err = fishai.CheckpointError
    if len(raw) < PREAMBLE.size:
        raise err(f"{path}: truncated ({len(raw)} bytes, shorter than the {PREAMBLE.size}-byte "
                  "preamble); re-export it with quantize.py")
    magic, version, _flags, header_len, payload_len = PREAMBLE.unpack_from(raw, 0)
    if magic != fishai.QUANT_MAGIC:
        raise err(f"{path}: not a FishAI quantized file (magic {magic!r}, expected {fishai.QUANT_MAGIC!r})")
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
        raise fishai.CheckpointError(f"{path}: cannot read quantized model ({e.strerror})") from None
    header_len, payload_start, payload_len = _check_layout(path, raw, verify)
    try:
        header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len].decode("utf-8"))
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"format {header.get('format')!r}")
        view = memoryview(raw)
        tensors = {e["name"]: _decode_entry(e, view, payload_start, payload_len) for e in header["tensors"]}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise fishai.CheckpointError(f"{path}: malformed header ({err}); re-export it with quantize.py") from None
    return header, tensors


def _check_tensors(path, config, tensors: dict) -> None:
    """Every parameter of the config's GPT is in the file with its shape, and nothing else."""
    shapes = fishai.param_shapes(config)
    missing = [n for n in shapes if n not in tensors]
    unexpected = [n for n in tensors if n not in shapes]
    wrong = [n for n, qt in tensors.items() if n in shapes and tuple(qt.shape) != tuple(shapes[n])]
    if missing or unexpected or wrong:
        raise fishai.CheckpointError(f"{path}: tensors do not match the model config (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")


def _dequantized_gpt(config, tensors: dict, device, dtype) -> "fishai.GPT":
    """The whole model as plain float weights (load_model(..., dequantize=True)): for training,
    export and as the reference of the quantized layers."""
    gpt = fishai.GPT(config)
    gpt.load_state_dict({name: qt.dequantize() for name, qt in tensors.items()}, strict=False)
    return gpt.to(device=device, dtype=dtype)


def _release_freed_memory() -> None:
    """Hand the heap memory that loading freed (the decoded codes, the int32 input of the int4
    packing) back to the OS: glibc keeps it otherwise, and a process holds 2-4x the file resident
    after the load (measured, small: int4 82 MB -> 31 MB, int8 66 -> 42, mixed 142 -> 69 for files
    of 17, 33 and 41 MB). glibc's malloc_trim; nothing elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def load_quantized(path, device="cpu", dtype=None, dequantize: bool = False):
    """Load a quantized .bin into a ready GPT (eval mode, .tokenizer from the header or None).
    By default the layers run quantized (build_runtime_model: int8/int4 kernels, the memory of
    the file); dequantize=True gives plain float weights instead. dtype (None: float32; "auto",
    "bf16", ... as model.resolve_dtype) is the activation dtype, and the dtype of the dequantized
    weights. Called by model.load_model for files that start with model.QUANT_MAGIC."""
    header, tensors = read_quantized(path)
    try:
        config = fishai.ModelConfig.from_dict(header["model_config"])
    except (ValueError, TypeError, KeyError) as err:
        raise fishai.CheckpointError(f"{path}: bad model config in header ({err})") from None
    _check_tensors(path, config, tensors)
    device = torch.device(device)
    dtype = fishai.resolve_dtype(dtype, device) or torch.float32
    build = _dequantized_gpt if dequantize else build_runtime_model
    gpt = build(config, tensors, device, dtype)
    del tensors
    _release_freed_memory()
    gpt.tokenizer = du.TextTokenizer.from_dict(header["tokenizer"]) if header.get("tokenizer") else None
    gpt.stage = header.get("stage")  # the training stage of the source checkpoint (generate.py --chat)
    return gpt.eval()


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


def build_runtime_model(config, tensors: dict, device, dtype) -> "fishai.GPT":
    """A GPT that runs the stored tensors as they are, with no float copy of a quantized weight:
    q8 -> Int8Linear, q4 -> Int4Linear, f16 -> HalfLinear (nn.Linear when dtype is fp16), f32 ->
    nn.Linear; q/k/v and gate/up of one kind also fused (_fuse); the tied embedding and head from
    _runtime_embedding; norms and RoPE tables in dtype. Built on the meta device, so the float
    model is never allocated."""
    with torch.device("meta"):
        gpt = fishai.GPT(config)
    for name, module in list(gpt.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, attr = name.rsplit(".", 1)
            setattr(gpt.get_submodule(parent), attr, _runtime_linear(tensors[name + ".weight"], device, dtype))
        elif isinstance(module, fishai.RMSNorm):
            module.weight = torch.nn.Parameter(tensors[name + ".weight"].dequantize().to(device, dtype))
    for i, block in enumerate(gpt.layers):
        for parent, names in ((block.attn, ("wq", "wk", "wv")), (block.mlp, ("w_gate", "w_up"))):
            prefix = f"layers.{i}.{'attn' if parent is block.attn else 'mlp'}"
            _fuse(parent, names, [tensors[f"{prefix}.{n}.weight"] for n in names], device, dtype)
    gpt.tok_emb, gpt.lm_head = _runtime_embedding(tensors["tok_emb.weight"], device, dtype)
    gpt.rope_cos, gpt.rope_sin = gpt.rope_cos.to(device, dtype), gpt.rope_sin.to(device, dtype)
    left = [n for n, t in itertools.chain(gpt.named_parameters(), gpt.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_runtime_model left tensors unset: {left[:3]}")
    return gpt


# ----------------------------------------------------------------------------------------------
# Export drivers

def quantize_model(gpt, strategy: str, group_size: int = DEFAULT_GROUP_SIZE, calibration: list | None = None,
                   damp: float = 0.01, progress: bool = True) -> tuple[dict, list[dict]]:
    """Quantize every parameter of a GPT. calibration: list of LongTensor (B, T) batches for GPTQ
    (None = round-to-nearest). Returns ({name: QTensor}, per-tensor report rows)."""
    state = {k: v.detach().float().cpu() for k, v in gpt.state_dict().items()}
    plan = {k: plan_qtype(k, v.shape, strategy) for k, v in state.items()}
    if "q4" in plan.values():
        _check_group_size(group_size)         # before the calibration passes, not after them
    calibrated = {}
    if calibration and any(q in ("q4", "q8") for q in plan.values()):
        work = copy.deepcopy(gpt).float().cpu().eval()
        calibrated = gptq_quantize_model(work, plan, calibration, group_size, damp, progress)
    tensors, rows = {}, []
    for name, w in tqdm(state.items(), desc="quantize", unit="tensor", disable=not progress):
        qt = calibrated.get(name) or quantize_rtn(w, plan[name], group_size, name)
        tensors[name] = qt
        nbytes = qt.nbytes
        rows.append({"name": name, "qtype": qt.qtype, "method": qt.method if qt.qtype in ("q4", "q8") else "-",
                     "shape": list(qt.shape), "params": w.numel(), "bytes": nbytes,
                     "bits_per_weight": 8.0 * nbytes / max(w.numel(), 1),
                     "group_size": qt.group_size, **quant_error(w, qt.dequantize())})
    return tensors, rows


def size_summary(rows: list[dict], file_bytes: int, source_bytes: int | None = None) -> dict:
    params = sum(r["params"] for r in rows)
    by_type: dict[str, dict] = {}
    for r in rows:
        t = by_type.setdefault(r["qtype"], {"tensors": 0, "params": 0, "bytes": 0})
        t["tensors"] += 1
        t["params"] += r["params"]
        t["bytes"] += r["bytes"]
    out = {"params": params, "file_bytes": file_bytes, "fp32_bytes": 4 * params, "fp16_bytes": 2 * params,
           "compression_vs_fp32": 4 * params / file_bytes, "compression_vs_fp16": 2 * params / file_bytes,
           "bits_per_weight": 8.0 * file_bytes / params, "by_qtype": by_type}
    if source_bytes is not None:
        out["source_file_bytes"] = source_bytes
        out["compression_vs_source_file"] = source_bytes / file_bytes
    return out


# ----------------------------------------------------------------------------------------------
# Quality before/after: bits/byte and perplexity with benchmark.py's scoring

def load_eval_texts(spec: str, limit: int | None = None) -> list[str]:
    """Evaluation texts for --eval-data (data_utils.load_eval_texts does the reading):
    "wikitext103" | "wikitext2" | "ptb" (HF download), "NAME:PATH" (local file/dir of that set,
    e.g. wikitext103:../shared/data/wikitext103), a WikiText file/dir (wiki.*.tokens: one text per
    article) or any other data_utils source (txt/jsonl/parquet/dir/glob). limit: first N texts."""
    names = ("wikitext103", "wikitext2", "ptb")
    name, _, rest = spec.partition(":")
    p = Path(spec)
    if spec in names:
        texts = du.load_eval_texts(spec)
    elif name in names and rest:
        texts = du.load_eval_texts(name, path=rest)
    elif p.is_file() and p.name.startswith("wiki.") or p.is_dir() and any(p.glob("wiki.*.tokens")):
        texts = du.load_eval_texts("wikitext103", path=str(p))
    elif spec.startswith("hf:") or p.exists() or any(ch in spec for ch in "*?["):
        texts = list(du.iter_documents(spec))
    else:
        raise QuantizeError(f"--eval-data {spec}: no such file, directory or known dataset "
                            f"({', '.join(names)}, or NAME:PATH)")
    texts = [t for t in texts if t.strip()]
    if limit:
        texts = texts[:limit]
    if not texts:
        raise QuantizeError(f"--eval-data {spec}: no text found")
    return texts


def eval_perplexity(spec, texts: list[str], batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity with benchmark.py's scoring (the numbers benchmark.py reports for the same file)."""
    lm = benchmark.load_lm(str(spec), device="cpu")
    return benchmark.perplexity(lm, texts, batch_size=batch_size, progress=progress)


PPL_KEYS = ("bits_per_byte", "token_ppl", "word_ppl", "char_ppl")


def ppl_delta(before: dict, after: dict) -> dict:
    return {k: after[k] / before[k] - 1.0 for k in PPL_KEYS
            if before.get(k) and after.get(k) is not None}


def format_perplexity(p: dict) -> str:
    """The console line of the report. Bits/byte leads: it compares across tokenizers and
    languages. Then token perplexity, and word perplexity for text with spaces between words or
    character perplexity for text without (Chinese, where a whitespace "word" is a whole sentence).
    `spaced` / `char_ppl` come from benchmark.perplexity (absent: treated as spaced text)."""
    before, after, change = p["before"], p["after"], p["relative_change"]

    def pair(label, key, digits):
        text = f"{label} {before[key]:.{digits}f} -> {after[key]:.{digits}f}"
        return text + (f" ({change[key]:+.2%})" if key in change else "")

    parts = [pair("bits/byte", "bits_per_byte", 4), pair("token ppl", "token_ppl", 3)]
    if before.get("spaced", True):
        parts.append(pair("word ppl", "word_ppl", 3))
    elif before.get("char_ppl") is not None:
        parts.append(pair("char ppl", "char_ppl", 3))
    return f"perplexity on {p['data']} ({p['documents']} docs): " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# The HF model card (README.md of --format hf)

def training_record(src: Path) -> dict | None:
    """step / best_val_loss / train_args / extra of a training checkpoint (.pt); None for a
    quantized .bin or an HF directory, which keep no training record."""
    if not src.is_file():
        return None
    with open(src, "rb") as f:
        if f.read(len(fishai.QUANT_MAGIC)) == fishai.QUANT_MAGIC:
            return None
    ckpt = fishai.load_checkpoint(src)
    return {k: ckpt.get(k) for k in ("step", "best_val_loss", "train_args", "extra")}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _card_training(source: Path, record: dict | None) -> list[str]:
    if record is None:
        return [f"Not recorded: the source `{source.name}` is a quantized export or an HF directory, which keep "
                "no training record. Export from the training checkpoint (`.pt`) to list it here."]
    args, extra = record.get("train_args") or {}, record.get("extra") or {}
    lines = [f"- source checkpoint: `{source.name}`, after {record.get('step')} optimizer steps"]
    if "data" in args:
        lines.append(f"- training data: `{args['data']}`" + (f" ({args['stage']})" if args.get("stage") else ""))
    if record.get("best_val_loss") is not None:
        lines.append(f"- best validation loss: {record['best_val_loss']:.4f}")
    lines += [f"- {k}: {_cell(v)}" for k, v in sorted(extra.items())]
    if args:
        lines += ["", "Training settings (the checkpoint's `train_args`):", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(args.items())]
    return lines


def _card_architecture(gpt, dtype_label: str) -> list[str]:
    c = gpt.config
    return ["| | |", "|---|---|",
            f"| parameters | {gpt.num_params():,} (the tied input/output embedding counted once) |",
            f"| weights | {dtype_label} |",
            f"| layers | {c.n_layers} |",
            f"| hidden size | {c.d_model} |",
            f"| attention | {c.n_heads} query heads, {c.n_kv_heads} key/value heads (grouped-query), "
            f"head dim {c.head_dim} |",
            f"| MLP | SwiGLU, intermediate size {c.d_ff} |",
            f"| vocabulary | {c.vocab_size} (byte-level BPE) |",
            f"| context length | {c.max_seq_len} tokens |",
            f"| positions | RoPE, theta {c.rope_theta:g} |",
            f"| normalization | pre-norm RMSNorm, eps {c.norm_eps:g} |"]


def _card_usage(gpt, source: Path, out: Path) -> list[str]:
    gguf_name = f"{out.name}.gguf"
    lines = [] if gpt.tokenizer is not None else [
        "The source had no tokenizer embedded, so this directory has none: add the one the model was trained "
        "with before loading it.", ""]
    lines += ["With transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{out}")',
              f'model = AutoModelForCausalLM.from_pretrained("{out}")',
              'ids = tok("The history of the city", return_tensors="pt").input_ids',
              "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))"]
    if gpt.tokenizer is not None and gpt.tokenizer.chat_template:
        lines.append("# chat: tok.apply_chat_template(messages, add_generation_prompt=True) (ChatML template)")
    lines += ["```", "", "With llama.cpp, export a GGUF file from the same source with FishAI Train and run it:", "",
              "```bash",
              f"python quantize.py --model {source} --output {gguf_name} --format gguf --strategy mixed",
              f'llama-cli -m {gguf_name} -p "The history of the city" -n 40',
              "```", "",
              "llama.cpp gives exactly this tokenizer's token ids (tested with llama-cpp-python 0.3.36).", "",
              f'With FishAI Train itself: `model.load_model("{out}")`, or '
              f'`python generate.py --model {out} --prompt "The history of the city"`.']
    return lines


def model_card(gpt, source, out, dtype_label: str, record: dict | None) -> str:
    """README.md for the HF directory: what the model is (a LLaMA-style decoder and its numbers),
    how it was trained (from the checkpoint's record) and how to load it."""
    source, out = Path(source), Path(out)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [fishai, llama]", "---",
             "", f"# {out.name}", "",
             "A LLaMA-style decoder-only language model made with FishAI Train, exported by "
             f"`quantize.py --format hf` as a `LlamaForCausalLM` (from `{source.name}`).", "",
             "## Architecture", "", *_card_architecture(gpt, dtype_label), "",
             "## Training", "", *_card_training(source, record), "",
             "## How to use", "", *_card_usage(gpt, source, out), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp); the gguf package is imported only here

GGUF_FILE_TYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "int8": "MOSTLY_Q8_0", "int4": "MOSTLY_Q4_0",
                   "mixed": "MOSTLY_Q4_0"}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder Q/K rows from HF's rotate-halves RoPE layout to llama.cpp's interleaved pairs (the
    same permutation as llama.cpp's convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(name: str, config) -> int | None:
    """Heads of a Q/K projection (whose rows llama.cpp wants permuted), None for other tensors."""
    if name.endswith("attn.wq.weight"):
        return config.n_heads
    if name.endswith("attn.wk.weight"):
        return config.n_kv_heads
    return None


def gguf_plan(name: str, shape, strategy: str) -> tuple[str, str | None]:
    """(GGML type name, fallback note). Q8_0/Q4_0 use blocks of 32 along each row: rows whose
    length is not a multiple of 32 fall back to F16. 1-D norms stay F32 as in llama.cpp."""
    if len(shape) != 2 or strategy == "fp32":
        return "F32", None
    want = {"fp16": "F16", "int8": "Q8_0", "int4": "Q4_0"}.get(strategy)
    if want is None:                                # mixed
        q = plan_qtype(name, shape, "mixed")
        want = {"f16": "F16", "q8": "Q8_0", "q4": "Q4_0"}[q]
    if want != "F16" and shape[1] % 32:
        return "F16", f"row length {shape[1]} is not a multiple of 32"
    return want, None


def _gguf_metadata(writer, config, strategy: str) -> None:
    """The llama-architecture hyperparameters. RoPE: plain (no scaling) over the whole head with
    our rope_theta; llama.cpp's llama RoPE rotates interleaved pairs, hence the Q/K row permutation."""
    import gguf
    writer.add_name("FishAI")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, GGUF_FILE_TYPES[strategy])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# llama.cpp's name for GPT-2's pre-tokenizer regex, which is exactly what our tokenizer splits with
# (tokenizers' ByteLevel(use_regex=True)). "default" would split digits in threes and punctuation
# apart ("1892" -> "189" "2"), so llama.cpp users got other ids than training used.
GGUF_PRE_TOKENIZER = "gpt-2"


def _gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) in the form llama.cpp's "gpt2" (byte-level BPE) tokenizer reads:
    BPE pieces in their byte-level spelling as NORMAL; special added tokens as CONTROL (llama.cpp
    parses them only with parse_special, as our encode does only with allow_special); other added
    tokens as USER_DEFINED (always matched, in HF tokenizers too); the ids past the tokenizer's
    vocabulary (the model rounds it up to a multiple of 64) as UNUSED placeholders."""
    import gguf
    tj = json.loads(tokenizer.to_dict()["tokenizer_json"])
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for tok, i in tj["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = tok, int(gguf.TokenType.NORMAL)
    for t in tj.get("added_tokens", []):
        if t["id"] < vocab_size:
            tokens[t["id"]] = t["content"]
            types[t["id"]] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return tokens, types, merges


def _gguf_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp needs it to give exactly our ids, stop where we stop and render our
    chat template (tested against llama-cpp-python in tests/test_quantize.py)."""
    tokens, types, merges = _gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")             # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
        # <|endoftext|> separates the training documents, so it is also what may precede one
        # (GPT-2 style); without a BOS id llama.cpp would assume id 11
        writer.add_bos_token_id(tokenizer.eos_id)
    if tokenizer.im_end_id is not None:
        # end of a chat turn; llama.cpp would otherwise guess it from the token texts
        writer.add_eot_token_id(tokenizer.im_end_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)                 # we never add BOS or EOS to a text
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensor(name: str, w: torch.Tensor, config, strategy: str):
    """(data, raw_dtype for GGUFWriter.add_tensor, report row) of one parameter, quantized by the
    gguf package's reference code (Q/K rows permuted for llama.cpp's RoPE)."""
    import gguf
    w = w.detach().float().cpu()
    heads = _rope_heads(name, config)
    if heads:
        w = llama_cpp_permute(w, heads)
    tname, note = gguf_plan(name, tuple(w.shape), strategy)
    qtype = getattr(gguf.GGMLQuantizationType, tname)
    data = gguf.quants.quantize(np.ascontiguousarray(w.numpy()), qtype)
    deq = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32))
    row = {"name": name, "gguf_name": fishai.external_name(name, "gguf"), "qtype": tname, "fallback": note,
           "shape": list(w.shape), "params": w.numel(), "bytes": int(data.nbytes),
           "bits_per_weight": 8.0 * data.nbytes / w.numel(), **quant_error(w, deq)}
    return data, (None if tname in ("F32", "F16") else qtype), row


def export_gguf(gpt, out_path, strategy: str, progress: bool = True) -> list[dict]:
    """Write a llama-architecture GGUF (atomic: data_utils.atomic_output). Returns per-tensor report rows."""
    import gguf
    rows = []
    with du.atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _gguf_metadata(writer, gpt.config, strategy)
        if gpt.tokenizer is not None:
            _gguf_tokenizer(writer, gpt.tokenizer, gpt.config.vocab_size)
        else:                                       # llama.cpp loads it for token-id input only
            writer.add_tokenizer_model("none")
        for name, w in tqdm(gpt.state_dict().items(), desc="gguf", unit="tensor", disable=not progress):
            data, raw_dtype, row = _gguf_tensor(name, w, gpt.config, strategy)
            writer.add_tensor(row["gguf_name"], data, raw_dtype=raw_dtype)
            rows.append(row)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return rows


def read_gguf_state(path, config) -> dict:
    """Read a GGUF written by export_gguf back into our parameter names (dequantized float32,
    Q/K rows un-permuted): {name: Tensor}. Uses the gguf package's reader."""
    import gguf
    by_name = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for name, shape in fishai.param_shapes(config).items():
        t = by_name[fishai.external_name(name, "gguf")]
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        heads = _rope_heads(name, config)
        out[name] = llama_cpp_unpermute(w, heads) if heads else w
    return out


# ----------------------------------------------------------------------------------------------
# CLI

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} GB"


def print_report(rows: list[dict], summary: dict, out=sys.stdout) -> None:
    print(f"{'tensor':<28}{'type':>6}{'method':>7}{'shape':>14}{'bytes':>11}{'bits/w':>8}"
          f"{'max|err|':>11}{'mean|err|':>11}{'rel':>9}", file=out)
    for r in rows:
        print(f"{r['name']:<28}{r['qtype']:>6}{r.get('method', '-'):>7}{'x'.join(map(str, r['shape'])):>14}"
              f"{r['bytes']:>11,}{r['bits_per_weight']:>8.2f}{r['max_abs_err']:>11.2e}"
              f"{r['mean_abs_err']:>11.2e}{r['rel_err']:>9.2%}"
              + (f"  (fallback: {r['fallback']})" if r.get("fallback") else ""), file=out)
    s = summary
    print(f"total: {s['params']:,} params, file {_fmt_bytes(s['file_bytes'])} "
          f"vs FP32 {_fmt_bytes(s['fp32_bytes'])} ({s['compression_vs_fp32']:.2f}x smaller) "
          f"and FP16 {_fmt_bytes(s['fp16_bytes'])} ({s['compression_vs_fp16']:.2f}x); "
          f"{s['bits_per_weight']:.2f} bits/weight", file=out)
    if "source_file_bytes" in s:
        print(f"source checkpoint file: {_fmt_bytes(s['source_file_bytes'])} "
              f"({s['compression_vs_source_file']:.2f}x the export)", file=out)


def _plan_output(args) -> tuple[str, str, Path]:
    """(format, strategy, output path) of a run, with every flag combination checked before any work."""
    fmt = args.format
    strategy = args.strategy or ("fp16" if fmt == "hf" else "mixed")
    out = Path(args.output or {"bin": f"fishai-{strategy}.bin", "gguf": f"fishai-{strategy}.gguf"}.get(fmt, "fishai-hf"))
    if fmt == "hf" and strategy not in ("fp16", "fp32"):
        raise QuantizeError(f"--format hf stores plain fp16/fp32 weights (got --strategy {strategy}); "
                            "use --format bin or gguf for int8/int4/mixed")
    if args.calibration_data and fmt != "bin":
        raise QuantizeError("--calibration-data applies to --format bin (GGUF uses llama.cpp's own Q8_0/Q4_0 rounding)")
    if fmt != "hf":
        du.check_new_file(out, "--output", args.overwrite)
    elif out.exists() and not out.is_dir():
        raise QuantizeError(f"--output {out} is a file; --format hf writes a directory")
    else:  # the directory is replaced as a whole: refuse one holding anything else, before any work
        du.check_output_apart(out, [args.model], "--output", "--model")
        du.check_replaceable_dir(out, fishai.is_hf_output, args.overwrite, "--output", "an HF model directory")
    du.check_new_file(args.json, "--json", args.overwrite)
    return fmt, strategy, out


def _calibration(gpt, args) -> tuple[list | None, dict | None]:
    """GPTQ calibration batches and their report entry (None, None without --calibration-data)."""
    if not args.calibration_data:
        return None, None
    max_len = gpt.config.max_seq_len
    seq_len = args.calibration_seq_len or min(512, max_len)
    if seq_len > max_len:
        raise QuantizeError(f"--calibration-seq-len {seq_len} is longer than the model's context ({max_len})")
    batches = calibration_batches(gpt.tokenizer, args.calibration_data, args.calibration_samples, seq_len,
                                  seed=args.seed, show_progress=not args.quiet)
    return batches, {"data": args.calibration_data, "samples": sum(len(b) for b in batches),
                     "seq_len": seq_len, "damp": args.damp, "method": "gptq"}


def _export_bin(gpt, args, strategy: str, out: Path, report: dict) -> tuple[list[dict], int]:
    calib, report["calibration"] = _calibration(gpt, args)
    tensors, rows = quantize_model(gpt, strategy, args.group_size, calib, args.damp, not args.quiet)
    tok = gpt.tokenizer.to_dict() if gpt.tokenizer is not None else None
    meta = {"strategy": strategy, "group_size": args.group_size, "calibration": report["calibration"],
            "source": Path(args.model).name, "stage": gpt.stage, "created_by": "quantize.py"}
    return rows, write_quantized(out, tensors, gpt.config.to_dict(), tok, meta=meta)


def _export_gguf(gpt, args, strategy: str, out: Path, report: dict) -> tuple[list[dict], int]:
    rows = export_gguf(gpt, out, strategy, not args.quiet)
    report["gguf_fallbacks"] = {r["name"]: r["fallback"] for r in rows if r.get("fallback")}
    return rows, out.stat().st_size


def _export_hf(gpt, args, strategy: str, out: Path, report: dict) -> tuple[list[dict], int]:
    dtype, qtype, bits = (torch.float16, "f16", 16) if strategy == "fp16" else (torch.float32, "f32", 32)
    rows = [{"name": n, "qtype": qtype, "method": "-", "shape": list(w.shape), "params": w.numel(),
             "bytes": w.numel() * bits // 8, "bits_per_weight": float(bits), **quant_error(w, w.to(dtype))}
            for n, w in gpt.state_dict().items()]
    src = Path(args.model)
    card = model_card(gpt, src, out, "FP16" if bits == 16 else "FP32", training_record(src))
    fishai.save_hf(gpt.to(dtype), out, tokenizer=gpt.tokenizer, overwrite=args.overwrite, model_card=card)
    return rows, sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


_EXPORTS = {"bin": _export_bin, "gguf": _export_gguf, "hf": _export_hf}


def _perplexity_report(src: Path, out: Path, fmt: str, texts: list[str], args) -> dict:
    if fmt == "gguf":
        return {"note": "not measured for gguf (llama.cpp formats); export --format bin to measure"}
    before = eval_perplexity(src, texts, args.eval_batch_size, not args.quiet)
    after = eval_perplexity(out, texts, args.eval_batch_size, not args.quiet)
    return {"data": args.eval_data, "documents": len(texts), "before": before, "after": after,
            "relative_change": ppl_delta(before, after)}


def run(args) -> dict:
    """The CLI as a function: export and return the report dict (raises a FishAIError on bad input)."""
    fmt, strategy, out = _plan_output(args)
    src = Path(args.model)
    gpt = fishai.load_model(src, device="cpu", dtype=torch.float32, dequantize=True)  # a .bin source too
    eval_texts = load_eval_texts(args.eval_data, args.limit) if args.eval_data else None
    report = {"source": str(src), "output": str(out), "format": fmt, "strategy": strategy,
              "group_size": args.group_size, "model_config": gpt.config.to_dict(),
              "date": time.strftime("%Y-%m-%d"), "calibration": None}
    t0 = time.time()
    rows, size = _EXPORTS[fmt](gpt, args, strategy, out, report)
    report["seconds"] = time.time() - t0
    report["summary"] = size_summary(rows, size, src.stat().st_size if src.is_file() else None)
    report["tensors"] = rows
    if eval_texts is not None:
        report["perplexity"] = _perplexity_report(src, out, fmt, eval_texts, args)
    return report


def _cli(args) -> None:
    report = run(args)
    s = report["summary"]
    if args.quiet:
        print(f"wrote {report['output']}: {_fmt_bytes(s['file_bytes'])}, {s['compression_vs_fp32']:.2f}x smaller "
              f"than FP32, {s['bits_per_weight']:.2f} bits/weight")
    else:
        print_report(report["tensors"], s)
    if "before" in report.get("perplexity", {}):
        print(format_perplexity(report["perplexity"]))
    if args.json:
        du.atomic_write_text(args.json, json.dumps(report, indent=2))


def main(argv=None) -> int:
    return du.run_cli(_cli, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
