"""
The quantized .bin format and the runtime a .bin runs on (docs/FORMAT.md): the tensors (`QTensor`,
round-to-nearest int8/int4 and fp16), the file (`write_quantized`, `read_quantized`) and the plain
modules (`Int8Linear`, `Int4Linear` on torch's int8/int4 weight-only kernels, fp16 layers, quantized
embeddings), installed into a GPT by `install_runtime_layers`.

It sits below model.py: model.load_model reads a .bin through it, and it knows the GPT only by its
parameter names. quantize.py (the command) chooses what to quantize and how, and writes the files.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common
import cpu_kernels
from common import QUANT_MAGIC, CheckpointError

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
    if y.dtype is not x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class Int8Linear(torch.nn.Module):
    """y = x W^T with W = codes * scales[:, None] (the .bin's q8: int8 codes, one scale per
    output row). kernel "fishai": cpu_kernels.q8_mm (a CPU with AVX512-VNNI; fp32 scales, x
    quantized per block of 32 as llama.cpp's Q8_0); "torch": torch's _weight_int8pack_mm (CPU and
    CUDA) on bf16 activations and bf16 scales; "": the layer dequantized for each call (never kept)
    where neither runs. weight: (N, K + pad) int8, zero columns appended for the kernel ("fishai":
    cpu_kernels.pack_int8's blocks of 16 rows, (N16, Kp)); scales
    (N,). Made by int8_linear."""
    lean_decode = True  # model.GPT's fast decode step may call forward directly

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, in_features: int, kernel: str):
        super().__init__()
        self.out_features, self.in_features, self.kernel = scales.shape[0], in_features, kernel
        self.pad = weight.shape[1] - in_features
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def rows(self, start: int, stop: int) -> "Int8Linear":
        """The layer of output rows start:stop, on row slices of this one's tensors (no copy)."""
        return Int8Linear(self.weight[start:stop], self.scales[start:stop], self.in_features, self.kernel)

    def kernel_spec(self):
        """This matmul for cpu_kernels.DecodeTrunk, or None when it does not run on FishAI's kernels."""
        return cpu_kernels.q8_linear(self.weight, self.scales, self.in_features) if self.kernel == "fishai" else None

    def forward(self, x):
        if self.kernel == "fishai":
            mm = cpu_kernels.q8_op if torch.compiler.is_compiling() else cpu_kernels.q8_mm
            return _unflat(mm(x, self.weight, self.scales), x)
        if self.kernel:  # torch._weight_int8pack_mm: torch.ops.aten's op, ~1 us less Python per call
            y = torch._weight_int8pack_mm(_flat2d(x, self.pad), self.weight, self.scales)
        else:
            y = torch.nn.functional.linear(x, self.weight[:, :self.in_features].to(x.dtype)) * self.scales.to(x.dtype)
        return _unflat(y, x)


def int8_kernel(device) -> str:
    """The int8 kernel a layer runs with on `device`: "fishai" (a CPU where cpu_kernels runs),
    "torch" (torch's, where it runs and is right), or "" (dequantized per call)."""
    device = torch.device(device)
    if device.type == "cpu" and cpu_kernels.available():
        return "fishai"
    return "torch" if _kernel_ok("int8", device) else ""


def int8_linear(codes: torch.Tensor, scales: torch.Tensor, device, kernel: str | bool | None = None) -> Int8Linear:
    """The Int8Linear of (N, K) int8 codes and (N,) scales on `device` (kernel: None = the best that
    runs here, int8_kernel; True = torch's; False = none)."""
    device = torch.device(device)
    kernel = int8_kernel(device) if kernel is None else {True: "torch", False: ""}.get(kernel, kernel)
    k = codes.shape[1]
    if kernel == "fishai":  # rows in blocks of 16, K zero-padded to 64 (cpu_kernels.pack_int8)
        weight = cpu_kernels.pack_int8(codes)
    else:  # torch's CPU kernel steps through K by 16 (other K give NaN or crash, measured): zero columns
        pad = _round_up(k, 16) - k if kernel == "torch" else 0  # here, and zeros appended to x in forward
        weight = torch.nn.functional.pad(codes.to(torch.int8), (0, pad)).contiguous()
    return Int8Linear(weight.to(device), scales.to(device, KERNEL_DTYPE if kernel == "torch" else torch.float32),
                      k, kernel)


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


def int4_mode(device, rows: int, group_size: int, fishai: bool = True) -> str:
    """How an int4 layer of `rows` output rows runs here: "fishai" (cpu_kernels, on a CPU where it
    runs, groups a multiple of 64 columns; fishai=False: never), "cpu" / "cuda" (torch's int4 kernel,
    when it exists and is right on this device) or "dequant" (dequantized for each call)."""
    kind = torch.device(device).type
    if fishai and kind == "cpu" and group_size % cpu_kernels.COLS == 0 and cpu_kernels.available():
        return "fishai"
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
    q4). mode "fishai": cpu_kernels.q4_mm, weight in cpu_kernels.pack_int4's layout (N16, Kp / 2:
    rows in blocks of 16), fp32 scales and scale * zero in cpu_kernels.block_scales' layout
    (kscales, kzeros: (N16 / 16, groups, 16)). mode "cpu" / "cuda": torch's
    _weight_int4pack_mm_for_cpu / _weight_int4pack_mm on bf16
    activations, which dequantize in the kernel as (q - 8) * scale + offset (our integer zero
    point becomes offset = (8 - zero) * scale): buffers weight (the kernel's packing of the codes,
    padded to K + pad columns) and scales_and_zeros (K / kernel_group, N, 2). mode "dequant" (no
    kernel for the device or shape): weight row-packed (N, ceil(K/2)) uint8, fp32 scales and zeros
    (N, groups), the layer dequantized for each call, never kept. Made by int4_linear."""
    lean_decode = True

    def __init__(self, mode: str, in_features: int, group_size: int, kernel_group: int, pad: int,
                 out_features: int | None = None, **buffers):
        super().__init__()
        self.mode, self.in_features, self.group_size = mode, in_features, group_size
        self.kernel_group, self.pad = kernel_group, pad
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.out_features = out_features or (self.scales_and_zeros[0] if mode in ("cpu", "cuda") else self.scales).shape[0]

    def rows(self, start: int, stop: int) -> "Int4Linear":
        """The layer of output rows start:stop on slices of this one's codes (whole blocks of the
        kernel layout; the caller checks the slice is that layer) and its own scales."""
        n, w = self.out_features, self.weight
        codes = w[start * w.shape[0] // n:stop * w.shape[0] // n]
        if self.mode == "dequant":
            buffers = {"weight": codes, "scales": self.scales[start:stop], "zeros": self.zeros[start:stop]}
        elif self.mode == "fishai":
            blocks = slice(start // cpu_kernels.ROWS, -(-stop // cpu_kernels.ROWS))  # whole blocks (else not fused)
            buffers = {"weight": codes, "kscales": self.kscales[blocks], "kzeros": self.kzeros[blocks]}
        else:
            buffers = {"weight": codes, "scales_and_zeros": self.scales_and_zeros[:, start:stop].contiguous()}
        return Int4Linear(self.mode, self.in_features, self.group_size, self.kernel_group, self.pad, stop - start,
                          **buffers)

    def kernel_spec(self):
        """This matmul for cpu_kernels.DecodeTrunk, or None when it does not run on FishAI's kernels."""
        if self.mode != "fishai":
            return None
        return cpu_kernels.q4_linear(self.weight, self.kscales, self.kzeros, self.group_size, self.in_features,
                                     self.out_features)

    def forward(self, x):
        if self.mode == "fishai":
            mm = cpu_kernels.q4_op if torch.compiler.is_compiling() else cpu_kernels.q4_mm
            return _unflat(mm(x, self.weight, self.kscales, self.kzeros, self.group_size, self.out_features), x)
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
    if mode == "fishai":
        s = qt.scales.float()
        return Int4Linear(mode, k, g, g, cpu_kernels.padded_cols(k) - k, n, weight=cpu_kernels.pack_int4(qt.codes),
                          kscales=cpu_kernels.block_scales(s), kzeros=cpu_kernels.block_scales(s * qt.zeros.float()))
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


# from this many rows of x (a prefill, a scoring batch) a HalfLinear casts its weight for torch's
# GEMM, which then beats the fp16 kernel (small's 2816x512 gate/up, one thread: 128 rows 4.0 ms vs
# 4.9; 64 rows 2.2 vs 1.7; 32 rows 1.3 vs 0.9)
F16_KERNEL_ROWS = 96


class HalfLinear(torch.nn.Module):
    """A weight kept as the .bin's fp16, computed in fp32 (every fp16 value is exact in fp32): by
    cpu_kernels.f16_mm on a CPU where it runs, for fewer than F16_KERNEL_ROWS rows of x (the fp16
    values converted in the kernel: 2-3x faster than torch's fp32 or bf16 matmuls at batch 1 on
    `small`, docs/RESULTS.md), else cast to the activation dtype for each call."""
    lean_decode = True

    def __init__(self, weight16: torch.Tensor, kernel: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight16.shape
        self.kernel = "fishai" if kernel and weight16.device.type == "cpu" and cpu_kernels.available() else ""
        # on the kernel: in its blocks of 16 rows (cpu_kernels.pack_f16)
        self.register_buffer("weight", cpu_kernels.pack_f16(weight16) if self.kernel else weight16.contiguous())

    def kernel_spec(self):
        """This matmul for cpu_kernels.DecodeTrunk (a decode step's few rows), or None without the kernels."""
        return cpu_kernels.f16_linear(self.weight, self.out_features) if self.kernel else None

    def forward(self, x):
        if self.kernel and x.numel() < F16_KERNEL_ROWS * self.in_features:
            mm = cpu_kernels.f16_op if torch.compiler.is_compiling() else cpu_kernels.f16_mm
            return _unflat(mm(x, self.weight, self.out_features), x)
        w = cpu_kernels.unpack_f16(self.weight, self.out_features) if self.kernel else self.weight
        return torch.nn.functional.linear(x, w.to(x.dtype))


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
        self.blocked = head.kernel == "fishai"  # the codes in the kernel's blocks of 16 rows

    def forward(self, idx):
        if self.blocked and not torch.compiler.is_compiling():  # one C call (a compiled step traces the torch ops)
            return cpu_kernels.embed_q8(self.weight, self.scales, self.cols, idx).to(self.out_dtype).view(
                *idx.shape, self.cols)
        if self.blocked:
            codes = cpu_kernels.unpack_int8(self.weight, self.cols, idx).view(*idx.shape, self.cols)
        else:
            codes = self.weight[idx, :self.cols]
        rows = codes.to(torch.float32) * self.scales[idx].unsqueeze(-1)
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
    """Lookups in the .bin's q4 table. The codes are read from the tied output layer's own tensor
    (`layout`): FishAI's kernel layout ("fishai") or a row-packed one ("rows") row by row, torch's
    CPU kernel layout ("cpu") through a per-row position table (7 bytes a row, instead of a second
    copy of the codes). CUDA's tiled layout (or a CPU layout this code does not know) gets a
    row-packed copy. Scales are the file's in fp32 (the head's own where it keeps them so), zero
    points its integers: rows are exactly the stored values."""
    lean_decode = True

    def __init__(self, qt: QTensor, head: Int4Linear, dtype):
        super().__init__()
        device = head.weight.device
        self.cols, self.group_size, self.out_dtype = qt.shape[1], qt.group_size, dtype
        layout = _find_int4_layout(head.weight, qt.codes) if head.mode == "cpu" else None
        self.layout = ("fishai" if head.mode == "fishai" else "rows" if head.mode == "dequant" or layout is None
                       else "cpu")
        if layout is not None:
            index = _int4_cpu_index(torch.arange(qt.shape[0]), qt.shape[0], head.weight.shape[1] * 2, *layout)
            for name, t, dt in zip(("start", "stride", "shift"), index, (torch.int32, torch.int16, torch.uint8)):
                self.register_buffer(name, t.to(device, dt))
        shared = head.mode in ("dequant", "fishai") or layout is not None
        self.register_buffer("weight", head.weight if shared else _pack_rows(qt.codes).to(device))
        # the head's fp32 scales where it keeps them (one copy: "fishai" in blocks of 16 rows, (N16 / 16,
        # groups, 16)); zero points are integers 0..15
        self.register_buffer("scales", head.kscales if head.mode == "fishai" else head.scales if head.mode == "dequant"
                             else qt.scales.to(device, torch.float32))
        self.register_buffer("zeros", qt.zeros.to(device, torch.uint8))

    def forward(self, idx):
        flat = idx.reshape(-1)
        fishai = self.layout == "fishai"
        if fishai and not torch.compiler.is_compiling():  # one C call (a compiled step traces the torch ops)
            return cpu_kernels.embed_q4(self.weight, self.scales, self.zeros, self.group_size, self.cols, flat).to(
                self.out_dtype).view(*idx.shape, self.cols)
        if fishai:
            codes = cpu_kernels.unpack_int4(self.weight, self.cols, flat)
        elif self.layout == "rows":
            codes = _unpack_rows(self.weight[flat], self.cols)
        else:
            codes = _int4_cpu_codes(self.weight, self.start[flat], self.stride[flat],
                                    self.shift[flat].to(torch.int32))[:, :self.cols]
        scales = self.scales[flat // cpu_kernels.ROWS, :, flat % cpu_kernels.ROWS] if fishai else self.scales[flat]
        rows = _dequant_rows(codes, scales, self.zeros[flat], self.group_size, torch.float32)
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


