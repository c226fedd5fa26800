"""
FishAI's own CPU matmuls for a .bin's int8 and int4 weights (cpu_kernels.c), used by quantized.py's
Int8Linear and Int4Linear on a CPU with AVX512-VNNI. torch's CPU kernels dequantize the weights to
bf16 for every product; these multiply integer codes by x quantized per block of 32 (llama.cpp's
scheme for its Q8_0/Q4_0 matmuls), 64 byte products an instruction, with the weights laid out in
blocks of 16 rows, one row a vector lane (pack_int8, pack_int4), so that one instruction serves 16
rows and the weights stream in order (docs/RESULTS.md has the speeds). DecodeTrunk runs a .bin's
whole decode step (every block) in one call.

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
COLS = 64                           # the kernels take K in steps of 64 columns
ROWS = 16                           # weight rows per block of the int8/int4 layouts (one a vector lane)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)

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
                                     " ".join(FLAGS + LIBS).encode()])).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(SOURCE), *LIBS, "-o", tmp], capture_output=True, text=True, timeout=300)
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
    lib.fishai_decode.argtypes = [ctypes.POINTER(_Trunk), p, i, p, p, ctypes.c_int]
    lib.fishai_embed_q8.argtypes = [p, i, p, i, i, p, i, p]
    lib.fishai_embed_q4.argtypes = [p, i, p, p, i, i, i, i, p, i, p]
    lib.fishai_decode.restype = lib.fishai_embed_q8.restype = lib.fishai_embed_q4.restype = ctypes.c_int
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
    """(M, N) fp32 = x (..., K) @ W^T, W = codes * scales (N,) fp32 per row; codes (N16, Kp) int8 in
    pack_int8's layout (rows in blocks of 16)."""
    return _run("fishai_q8_mm", x, scales.shape[0], codes.data_ptr(), codes.shape[1], scales.data_ptr())


def f16_mm(x: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) fp32 = x (..., K) @ W^T, W (n, K) fp16 in pack_f16's layout (N16, K), in fp32 arithmetic."""
    return _run("fishai_f16_mm", x, n, weight.data_ptr())


def q4_mm(x: torch.Tensor, packed: torch.Tensor, kscales: torch.Tensor, kzeros: torch.Tensor,
          group_size: int, n: int) -> torch.Tensor:
    """(M, n) fp32 = x (..., K) @ W^T, W[r, c] = (code - zero) * scale per row and group of
    group_size (a multiple of 64) columns: packed (N16, Kp / 2) uint8 (pack_int4's layout, rows in
    blocks of 16), kscales and kzeros (= scale * zero) in block_scales' layout (N16 / 16, groups, 16)."""
    return _run("fishai_q4_mm", x, n, packed.data_ptr(), packed.shape[1] * 2, kscales.data_ptr(),
                kzeros.data_ptr(), kscales.shape[1], group_size)


# The same matmuls as torch custom ops, for a compiled step (torch.compile traces through them; the
# layers call the plain functions when eager: a custom op's dispatch costs ~10 us a call)
@torch.library.custom_op("fishai::q8_mm", mutates_args=())
def q8_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q8_mm(x, codes, scales)


@torch.library.custom_op("fishai::q4_mm", mutates_args=())
def q4_op(x: torch.Tensor, packed: torch.Tensor, kscales: torch.Tensor, kzeros: torch.Tensor,
          group_size: int, n: int) -> torch.Tensor:
    return q4_mm(x, packed, kscales, kzeros, group_size, n)


@torch.library.custom_op("fishai::f16_mm", mutates_args=())
def f16_op(x: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    return f16_mm(x, weight, n)


def _fake(x: torch.Tensor, n: int) -> torch.Tensor:
    """What a kernel op returns, for tracing: (M, n) fp32."""
    return x.new_empty((x.numel() // x.shape[-1], n), dtype=torch.float32)


q8_op.register_fake(lambda x, codes, scales: _fake(x, scales.shape[0]))
q4_op.register_fake(lambda x, packed, kscales, kzeros, group_size, n: _fake(x, n))
f16_op.register_fake(lambda x, weight, n: _fake(x, n))


def _row_blocks(t: torch.Tensor) -> torch.Tensor:
    """t (N, ...) with zero rows appended to a multiple of ROWS, viewed as (N16 / 16, 16, ...)."""
    t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, -t.shape[0] % ROWS))
    return t.view(-1, ROWS, *t.shape[1:])


def _block_rows(packed: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """(R, vectors, bytes): `rows` (default: every row, padding included) of a blocked layout the
    caller views as (N16 / 16, vectors, 16, bytes)."""
    rows = torch.arange(packed.shape[0] * ROWS) if rows is None else rows.reshape(-1).long()
    return packed[rows // ROWS, :, rows % ROWS]


def _embed(kernel: str, idx: torch.Tensor, k: int, n: int, *table) -> torch.Tensor:
    """(len(idx), k) fp32 rows of a blocked table with n rows, gathered and dequantized in one C call
    (an embedding lookup in torch ops is ~10 of them: at batch 1 that is a tenth of a step)."""
    flat = idx.reshape(-1)
    flat = flat if flat.dtype is torch.int64 and flat.is_contiguous() else flat.to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), k, dtype=torch.float32)
    if getattr(_state.get("lib") or library(), kernel)(*table, k, n, flat.data_ptr(), flat.numel(), out.data_ptr()):
        raise IndexError(f"token id out of range: the table has {n} rows, got ids {flat.min()}..{flat.max()}")
    return out


def embed_q8(codes: torch.Tensor, scales: torch.Tensor, k: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx of an int8 table in pack_int8's layout as fp32 (code * scales[row]): exactly the
    rows of unpack_int8(codes, k, idx) * scales[idx]."""
    return _embed("fishai_embed_q8", idx, k, scales.shape[0], codes.data_ptr(), codes.shape[1], scales.data_ptr())


def embed_q4(packed: torch.Tensor, kscales: torch.Tensor, zeros: torch.Tensor, group_size: int, k: int,
             idx: torch.Tensor) -> torch.Tensor:
    """Rows idx of an int4 table in pack_int4's layout as fp32, (code - zero) * scale per group:
    zeros (N, groups) uint8, kscales in block_scales' layout; the same bits as dequantizing
    unpack_int4(packed, k, idx) in fp32."""
    zeros = zeros if zeros.is_contiguous() else zeros.contiguous()
    return _embed("fishai_embed_q4", idx, k, zeros.shape[0], packed.data_ptr(), packed.shape[1] * 2,
                  kscales.data_ptr(), zeros.data_ptr(), zeros.shape[1], group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N16, Kp / 2) uint8, the q4 kernel's layout (N16 = N rounded up to 16,
    zero rows appended; Kp = K rounded up to 64): rows in blocks of 16, each block a run of 64-byte
    vectors of 8 columns x 16 rows, 4 bytes a row; byte t of row i holds column 8c + t (low nibble)
    and 8c + 4 + t (high)."""
    kp = padded_cols(codes.shape[1])
    c = _row_blocks(torch.nn.functional.pad(codes.to(torch.uint8), (0, kp - codes.shape[1])))
    c = c.view(c.shape[0], ROWS, kp // 8, 2, 4)                    # block, row, vector, nibble, byte
    packed = c[:, :, :, 0] | (c[:, :, :, 1] << 4)                  # (blocks, 16, vectors, 4)
    return packed.transpose(1, 2).contiguous().view(-1, kp // 2)


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes -> (N16, Kp) int8, the q8 kernel's layout (N16 = N rounded up to 16, zero
    rows appended; Kp = K rounded up to 64, zero columns): rows in blocks of 16, each block a run
    of 64-byte vectors of 4 columns x 16 rows, 4 bytes a row."""
    kp = padded_cols(codes.shape[1])
    c = _row_blocks(torch.nn.functional.pad(codes.to(torch.int8), (0, kp - codes.shape[1])))
    return c.view(c.shape[0], ROWS, kp // 4, 4).transpose(1, 2).contiguous().view(-1, kp)


def unpack_int8(packed: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The (R, k) int8 codes of `rows` (default: every row, padding included) of pack_int8's layout."""
    n16, kp = packed.shape
    return _block_rows(packed.view(n16 // ROWS, kp // 4, ROWS, 4), rows).reshape(-1, kp)[:, :k]


def pack_f16(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) fp16 -> (N16, K) fp16, the f16 kernel's layout: rows in blocks of 16, each block
    column after column, a column's 16 values side by side (zero rows appended)."""
    return _row_blocks(weight.to(torch.float16)).transpose(1, 2).contiguous().view(-1, weight.shape[1])


def unpack_f16(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, K) fp16 weight of pack_f16's layout."""
    n16, k = packed.shape
    return packed.view(n16 // ROWS, k, ROWS).transpose(1, 2).reshape(n16, k)[:n]


def unpack_int4(packed: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The (R, k) codes (int32) of `rows` (default: every row, padding included) of pack_int4's layout."""
    n16, kp = packed.shape[0], packed.shape[1] * 2
    b = _block_rows(packed.view(n16 // ROWS, kp // 8, ROWS, 4), rows).to(torch.int32)  # (R, vectors, 4)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(-1, kp)[:, :k]


def block_scales(t: torch.Tensor) -> torch.Tensor:
    """(N, groups) fp32 per-row values -> (N16 / 16, groups, 16): the 16 rows of a block side by
    side, as the q4 kernel loads them (zeros for the padding rows)."""
    return _row_blocks(t.float()).transpose(1, 2).contiguous()


def quantize_x(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the kernels see it: each block of 32 as round(x / d) * d, d = max|x| / 127 (fp32,
    the kernels' own rounding): the exact reference the tests hold the kernels to."""
    m, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, padded_cols(k) - k)).view(m, -1, BLOCK)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xp * inv) * (amax / 127.0)).view(m, -1)[:, :k]


# -- the decode trunk: every block of one decode step in one C call (fishai_decode)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class Linear(ctypes.Structure):
    """One matmul as the trunk calls it (cpu_kernels.c's fishai_linear): made by q8_linear,
    q4_linear and f16_linear from a layer's own tensors, which must outlive it."""
    _fields_ = [("kind", _i64), ("w", _ptr), ("s", _ptr), ("sz", _ptr),
                ("N", _i64), ("K", _i64), ("Kp", _i64), ("ng", _i64), ("G", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _ptr), ("mlp_norm", _ptr), ("k", _ptr), ("v", _ptr), ("n_qkv", _i64),
                ("n_gu", _i64), ("qkv", Linear * 3), ("wo", Linear), ("gu", Linear * 2), ("down", Linear)]


class _Trunk(ctypes.Structure):
    _fields_ = [("n_layers", _i64), ("d", _i64), ("H", _i64), ("KV", _i64), ("hd", _i64), ("d_ff", _i64),
                ("length", _i64), ("eps", ctypes.c_float), ("cos", _ptr), ("sin", _ptr), ("final_norm", _ptr),
                ("layers", ctypes.POINTER(_Layer))]


def q8_linear(codes: torch.Tensor, scales: torch.Tensor, k: int) -> Linear:
    # N is the layer's rows (scales), not the packed codes' (a multiple of 16): the trunk writes
    # exactly N columns of its q | k | v or gate | up row
    return Linear(1, codes.data_ptr(), scales.data_ptr(), None, scales.shape[0], k, codes.shape[1], 0, 0)


def q4_linear(packed: torch.Tensor, kscales: torch.Tensor, kzeros: torch.Tensor, group_size: int, k: int,
              n: int) -> Linear:
    return Linear(2, packed.data_ptr(), kscales.data_ptr(), kzeros.data_ptr(), n, k, packed.shape[1] * 2,
                  kscales.shape[1], group_size)


def f16_linear(weight: torch.Tensor, n: int) -> Linear:
    return Linear(3, weight.data_ptr(), None, None, n, weight.shape[1], weight.shape[1], 0, 0)


class DecodeTrunk:
    """Every transformer block of a decode step (or of a short prefill piece of one row) and the
    final norm in one C call, for a model whose every matmul runs on these kernels: at batch 1 the
    ~25 torch ops and 4 Python kernel calls a block costs in eager mode become none (engine.Engine
    uses it; the math is Engine._forward's, each token on its own, so a row's result does not
    depend on the others).

    layers: per block a dict with attn_norm, mlp_norm (fp32 (d,)), qkv (1 or 3 Linear, outputs side
    by side as q | k | v), wo, gate_up (1 or 2), down; keys/values: the engine's fp32 caches
    (rows, KV, length, hd); cos/sin (positions, hd / 2). Keeps every tensor it points at alive."""

    def __init__(self, config, layers: list, keys: list, values: list, cos: torch.Tensor, sin: torch.Tensor,
                 final_norm: torch.Tensor, eps: float):
        c = config
        self._keep = [keys, values, cos, sin, final_norm, layers]
        arr = (_Layer * len(layers))()
        for a, ly, kc, vc in zip(arr, layers, keys, values):
            a.attn_norm, a.mlp_norm = ly["attn_norm"].data_ptr(), ly["mlp_norm"].data_ptr()
            a.k, a.v = kc.data_ptr(), vc.data_ptr()
            a.n_qkv, a.n_gu = len(ly["qkv"]), len(ly["gate_up"])
            for i, spec in enumerate(ly["qkv"]):
                a.qkv[i] = spec
            for i, spec in enumerate(ly["gate_up"]):
                a.gu[i] = spec
            a.wo, a.down = ly["wo"], ly["down"]
        self._layers = arr
        self.cache_rows, self.length = keys[0].shape[0], keys[0].shape[2]
        self.struct = _Trunk(len(layers), c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, self.length,
                             eps, cos.data_ptr(), sin.data_ptr(), final_norm.data_ptr(), arr)
        self._ref = ctypes.byref(self.struct)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (B, d) contiguous fp32 embeddings -> the final normed hidden state, in place: row b is the
        token at position pos[b] of cache row rows[b] (int64 (B,) each; a decode step: B cache rows at
        their positions; a prefill piece: one cache row at consecutive positions)."""
        pos, rows = (t if t.dtype is torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()
                     for t in (pos, rows))
        if pos.numel() != x.shape[0] or rows.numel() != x.shape[0]:
            raise ValueError(f"{x.shape[0]} rows of x need as many positions and cache rows, got {pos.numel()} "
                             f"and {rows.numel()}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.cache_rows):
            raise ValueError(f"KV cache of {self.cache_rows} rows: rows {rows.tolist()} do not fit")
        rc = _state["lib"].fishai_decode(self._ref, x.data_ptr(), x.shape[0], pos.data_ptr(), rows.data_ptr(),
                                         torch.get_num_threads())
        if rc:
            raise ValueError(f"decode position outside the KV cache of {self.length} positions: {pos.tolist()}")
        return x
