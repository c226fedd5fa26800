"""
FishAI's own CPU matmuls for a .bin's int8 and int4 weights (cpu_kernels.c), used by quantized.py's
Int8Linear and Int4Linear on a CPU with AVX512-VNNI. torch's CPU kernels dequantize the weights to
bf16 for every product; these multiply integer codes by x quantized per block of 32 (llama.cpp's
scheme for its Q8_0/Q4_0 matmuls), 64 byte products an instruction: 2-2.7x faster than torch's int8
kernel and 1.1-1.5x its int4 kernel on `small`'s shapes at batch 1 (docs/RESULTS.md).

    import cpu_kernels
    cpu_kernels.status()            # "FishAI AVX512-VNNI kernels" or "torch's kernels (why)"
    y = cpu_kernels.q8_mm(x, codes, scales)        # x (M, K) fp32, codes (N, Kp) int8, scales (N,)

The C file is compiled on first use with the system C compiler (`cc`, or $CC) for this CPU
(-march=native) into ~/.cache/fishai/kernels (or $XDG_CACHE_HOME/fishai/kernels), keyed by the
source, the compiler and the CPU's flags, and loaded with ctypes: under a second, once per machine.
Where that cannot happen (no compiler, no AVX512-VNNI, not Linux x86-64, FISHAI_CPU_KERNELS=0) the
layers use torch's kernels, and status() says why in one line.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ENV = "FISHAI_CPU_KERNELS"          # "0": torch's kernels only (a comparison, or an escape hatch)
BLOCK = 32                          # values of x per quantization scale
COLS = 64                           # the kernels take K in steps of 64 columns (one vpdpbusd)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict = {}                   # "lib": the loaded library, or "why": the reason there is none


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fishai" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _build() -> Path:
    """The compiled library for this source, compiler and CPU: built once (to a temporary name,
    then renamed, so a concurrent process never loads half a file), then reused."""
    src = SOURCE.read_bytes()
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([src, cc.encode(), version.encode(), _cpu_flags().encode(),
                                     " ".join(FLAGS).encode()])).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            first = next((line for line in r.stderr.splitlines() if "error" in line), r.stderr.strip()[:200])
            raise RuntimeError(f"{cc} could not compile {SOURCE.name}: {first}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL:
    if os.environ.get(ENV, "1") == "0":
        raise RuntimeError(f"{ENV}=0")
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"they are for Linux on x86-64, not {sys.platform} on {platform.machine()}")
    if "avx512_vnni" not in _cpu_flags().split():
        raise RuntimeError("this CPU has no AVX512-VNNI")
    try:
        lib = ctypes.CDLL(str(_build()))
    except FileNotFoundError:
        raise RuntimeError(f"no C compiler ({_compiler()}) to build them: install gcc") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"building them failed: {str(e).splitlines()[0][:200]}") from None
    if not lib.fishai_caps():
        raise RuntimeError(f"{_compiler()} built them without AVX512-VNNI")
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.fishai_q8_mm.argtypes = [p, i, i, p, i, p, i, p, ctypes.c_int]
    lib.fishai_q4_mm.argtypes = [p, i, i, p, i, p, p, i, i, i, p, ctypes.c_int]
    lib.fishai_f16_mm.argtypes = [p, i, i, p, i, p, ctypes.c_int]
    lib.fishai_q8_mm.restype = lib.fishai_q4_mm.restype = lib.fishai_f16_mm.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The kernels, built and loaded on first call; None where they cannot run (why() says why)."""
    if not _state:
        with _lock:
            if not _state:
                try:
                    _state["lib"] = _load()
                except RuntimeError as e:
                    _state["why"] = str(e)
    return _state.get("lib")


def available() -> bool:
    return library() is not None


def why() -> str | None:
    """Why the kernels do not run here (one line), or None when they do."""
    library()
    return _state.get("why")


def status() -> str:
    """One line for a load message or a benchmark row: which int8/int4 CPU kernels run here."""
    return "FishAI AVX512-VNNI kernels" if available() else f"torch's kernels ({why()})"


def reset() -> None:
    """Forget the loaded state, so the next call looks again (tests that set FISHAI_CPU_KERNELS)."""
    with _lock:
        _state.clear()


def padded_cols(k: int) -> int:
    """The weight columns a kernel layer stores for k inputs: k rounded up to 64, zeros appended."""
    return -(-k // COLS) * COLS


def _x2d(x: torch.Tensor) -> torch.Tensor:
    """x as the contiguous (M, K) fp32 matrix the kernels read (a decode step's x already is: at
    batch 1 every microsecond of Python counts, ~25 calls a token)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype is not torch.float32:
        x2 = x2.float()
    return x2 if x2.is_contiguous() else x2.contiguous()


def _run(kernel: str, x: torch.Tensor, n: int, *weights) -> torch.Tensor:
    """(M, N) fp32 from one of the C kernels, called as kernel(x, M, K, *weights, N, y, threads)."""
    x2 = _x2d(x)
    m, k = x2.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        getattr(_state.get("lib") or library(), kernel)(x2.data_ptr(), m, k, *weights, n, y.data_ptr(),
                                                        torch.get_num_threads())
    return y


def q8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, N) fp32 = x (..., K) @ W^T, W = codes (N, Kp) int8 * scales (N,) fp32 per row."""
    return _run("fishai_q8_mm", x, codes.shape[0], codes.data_ptr(), codes.shape[1], scales.data_ptr())


def f16_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, N) fp32 = x (..., K) @ W^T, W (N, K) fp16 (contiguous), in fp32 arithmetic."""
    return _run("fishai_f16_mm", x, weight.shape[0], weight.data_ptr())


def q4_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
          group_size: int) -> torch.Tensor:
    """(M, N) fp32 = x (..., K) @ W^T, W[n, c] = (code - zero) * scale per row and group of
    group_size (a multiple of 64) columns: packed (N, Kp / 2) uint8 (pack_int4's layout), scales and
    scaled_zeros (= scale * zero) (N, groups) fp32."""
    return _run("fishai_q4_mm", x, packed.shape[0], packed.data_ptr(), packed.shape[1] * 2, scales.data_ptr(),
                scaled_zeros.data_ptr(), scales.shape[1], group_size)


# The same matmuls as torch custom ops, for a compiled step (torch.compile traces through them; the
# layers call the plain functions when eager: a custom op's dispatch costs ~10 us a call)
@torch.library.custom_op("fishai::q8_mm", mutates_args=())
def q8_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q8_mm(x, codes, scales)


@torch.library.custom_op("fishai::q4_mm", mutates_args=())
def q4_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
          group_size: int) -> torch.Tensor:
    return q4_mm(x, packed, scales, scaled_zeros, group_size)


@torch.library.custom_op("fishai::f16_mm", mutates_args=())
def f16_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return f16_mm(x, weight)


def _fake(x: torch.Tensor, w: torch.Tensor, *rest) -> torch.Tensor:
    return x.new_empty((x.numel() // x.shape[-1], w.shape[0]), dtype=torch.float32)


for _op in (q8_op, q4_op, f16_op):
    _op.register_fake(_fake)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, Kp / 2) uint8, the q4 kernel's layout (Kp = K rounded up to 64):
    one 64-byte load holds 128 columns, byte i column i (low nibble) and column 64 + i (high); a
    last 64 columns alone are 32 bytes, byte i column i and 32 + i."""
    n, k = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, padded_cols(k) - k))
    full = c.shape[1] // (2 * COLS) * (2 * COLS)
    parts = [c[:, :full].reshape(n, full // (2 * COLS), 2, COLS)]
    if c.shape[1] > full:
        parts.append(c[:, full:].reshape(n, 1, 2, COLS // 2))
    return torch.cat([(p[:, :, 0] | (p[:, :, 1] << 4)).reshape(n, -1) for p in parts], dim=1).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The (R, k) codes of rows of pack_int4's layout (int32)."""
    r = packed.shape[0]
    full = packed.shape[1] // COLS * COLS                # bytes of the whole 128-column chunks
    parts = [packed[:, :full].reshape(r, full // COLS, COLS)]
    if packed.shape[1] > full:
        parts.append(packed[:, full:].reshape(r, 1, COLS // 2))
    p = [q.to(torch.int32) for q in parts]
    return torch.cat([torch.stack((q & 15, q >> 4), dim=2).reshape(r, -1) for q in p], dim=1)[:, :k]


def quantize_x(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the kernels see it: each block of 32 as round(x / d) * d, d = max|x| / 127 (fp32,
    the kernels' own rounding): the exact reference the tests hold the kernels to."""
    m, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, padded_cols(k) - k)).view(m, -1, BLOCK)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xp * inv) * (amax / 127.0)).view(m, -1)[:, :k]
