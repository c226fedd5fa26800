"""cpu_kernels: FishAI's int8 / int4 / fp16 CPU matmuls against their exact references, rows and
threads that do not change a result, the build cache, and the one-line reasons of the fallback."""
import stat

import pytest
import torch

import cpu_kernels as K
from quantized import int4_linear, int8_linear, quantize_rtn

needs_kernels = pytest.mark.skipif(not K.available(), reason=f"FishAI's CPU kernels do not run here: {K.why()}")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A clean kernel state (and cache) for a test that changes the environment; the real one after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    K.reset()
    yield tmp_path
    monkeypatch.undo()
    K.reset()


def _ref(x, w):
    """x quantized as the kernels quantize it, times the stored weights, in float64."""
    return (K.quantize_x(x).double() @ w.double().T)


def _close(y, ref, x, w, rel=2e-6):
    """Within fp32 summation error: rel x sum |x| |w| per output."""
    bound = rel * (x.abs().double() @ w.abs().double().T) + 1e-7
    return bool(((y.double() - ref).abs() <= bound).all())


@needs_kernels
@pytest.mark.parametrize("n,k", [(64, 256), (48, 200), (100, 1408), (7, 64), (33, 65)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_q8_is_the_block_quantized_product(n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(m, k, generator=g)
    qt = quantize_rtn(w, "q8")
    layer = int8_linear(qt.codes, qt.scales, "cpu")
    assert layer.kernel == "fishai" and layer.weight.shape == (-(-n // 16) * 16, K.padded_cols(k))
    assert torch.equal(K.unpack_int8(layer.weight, k)[:n], qt.codes)   # pack_int8 keeps every code
    y = layer(x)
    assert y.shape == (m, n) and _close(y, _ref(x, qt.dequantize()), x, qt.dequantize())
    # and what quantizing x costs against the exact fp32 product: about llama.cpp's Q8_0 error
    exact = x @ qt.dequantize().T
    assert (y - exact).norm() <= 0.02 * exact.norm()


@needs_kernels
@pytest.mark.parametrize("n,k,group", [(64, 256, 128), (48, 200, 128), (96, 704, 128), (32, 512, 64), (16, 512, 256),
                                       (40, 192, 64), (24, 64, 64), (8, 320, 128)])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_q4_is_the_block_quantized_product(n, k, group, m):
    """Groups of 64-256 columns, a shorter last group (200, 704 = 5.5 x 128), K not a multiple of 64."""
    g = torch.Generator().manual_seed(n + k + group + m)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(m, k, generator=g)
    qt = quantize_rtn(w, "q4", group)
    layer = int4_linear(qt, "cpu")
    assert layer.mode == "fishai"
    y = layer(x)
    assert y.shape == (m, n) and _close(y, _ref(x, qt.dequantize()), x, qt.dequantize())


@needs_kernels
def test_q4_groups_the_kernel_cannot_take_use_torch():
    qt = quantize_rtn(torch.randn(32, 256), "q4", 32)
    assert int4_linear(qt, "cpu").mode == "cpu"


@needs_kernels
@pytest.mark.parametrize("n,k,m", [(64, 256, 1), (100, 1408, 8), (33, 70, 3), (5, 16, 2), (9, 7, 1)])
def test_f16_is_the_fp32_product_of_the_fp16_values(n, k, m):
    g = torch.Generator().manual_seed(n + k)
    w, x = (torch.randn(n, k, generator=g) * 0.05).half(), torch.randn(m, k, generator=g)
    packed = K.pack_f16(w)
    assert packed.shape == (-(-n // 16) * 16, k) and torch.equal(K.unpack_f16(packed, n), w)
    if n > 16:  # block 1, column 2: rows 16..31 side by side
        assert torch.equal(packed.view(-1)[16 * k + 2 * 16:16 * k + 3 * 16][:min(16, n - 16)], w[16:32, 2])
    y = K.f16_mm(x, packed, n)
    assert y.shape == (m, n) and _close(y, x.double() @ w.double().T, x, w.float())


@needs_kernels
def test_a_row_gets_the_same_bits_alone_batched_and_on_any_thread_count():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(96, 704, generator=g) * 0.05, torch.randn(8, 704, generator=g)
    q8, q4 = quantize_rtn(w, "q8"), quantize_rtn(w, "q4", 128)
    layers = [int8_linear(q8.codes, q8.scales, "cpu"), int4_linear(q4, "cpu"),
              lambda t: K.f16_mm(t, K.pack_f16(w.half()), 96)]
    threads = torch.get_num_threads()
    try:
        for f in layers:
            together = f(x)
            alone = torch.cat([f(x[i:i + 1]) for i in range(8)])
            torch.set_num_threads(2)
            two = f(x)
            torch.set_num_threads(1)
            assert torch.equal(together, alone) and torch.equal(together, two) and torch.equal(together, f(x))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n,k", [(5, 200), (16, 256), (33, 64), (20, 70), (48, 320)])
def test_int4_packing_round_trips(n, k):
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(6))
    packed = K.pack_int4(codes)
    n16 = -(-n // 16) * 16
    assert packed.shape == (n16, K.padded_cols(k) // 2) and packed.dtype == torch.uint8
    unpacked = K.unpack_int4(packed, k)
    assert torch.equal(unpacked[:n], codes.to(torch.int32)) and not unpacked[n:].any()  # zero padding rows
    rows = torch.tensor([n - 1, 0, n // 2])
    assert torch.equal(K.unpack_int4(packed, k, rows), codes[rows].to(torch.int32))
    # block 0, vector 0: 4 bytes a row, byte t = column t (low nibble) and column 4 + t (high)
    assert int(packed.view(-1)[4 * 1 + 2]) == int(codes[1, 2]) | int(codes[1, 6]) << 4
    if n > 16:  # the second block starts after the first block's n16 / 16 x Kp / 2 bytes
        assert int(packed.view(-1)[8 * K.padded_cols(k)]) == int(codes[16, 0]) | int(codes[16, 4]) << 4
    # vector 1 (columns 8..15) follows the 16 rows of vector 0
    assert int(packed.view(-1)[64 + 4 * 3]) == int(codes[3, 8]) | int(codes[3, 12]) << 4
    scales = torch.rand(n, 3)
    bs = K.block_scales(scales)
    assert bs.shape == (n16 // 16, 3, 16) and torch.equal(bs[0, 2, 1], scales[1, 2])


@needs_kernels
@pytest.mark.parametrize("n,k,group", [(5, 200, 64), (33, 128, 64), (40, 96, 64), (16, 256, 128)])
def test_the_embedding_lookups_are_the_stored_rows_dequantized(n, k, group):
    """embed_q8 / embed_q4 (one C call a lookup) give bitwise the rows the torch ops give from the
    blocked layouts: codes * row scale; (code - zero) * scale per group, a shorter last group (k=96
    in groups of 64) included. A token id outside the table is an IndexError, nothing written."""
    g = torch.Generator().manual_seed(8)
    idx = torch.tensor([n - 1, 0, n // 2, 0])
    codes8, scales8 = torch.randint(-127, 128, (n, k), generator=g), torch.rand(n, generator=g) + 0.01
    want8 = codes8[idx].float() * scales8[idx, None]
    assert torch.equal(K.embed_q8(K.pack_int8(codes8), scales8, k, idx), want8)
    ng = -(-k // group)
    codes4, zeros = torch.randint(0, 16, (n, k), generator=g), torch.randint(0, 16, (n, ng), generator=g)
    scales4 = torch.rand(n, ng, generator=g) + 0.01
    col_group = torch.arange(k) // group
    want4 = (codes4[idx].float() - zeros[idx][:, col_group].float()) * scales4[idx][:, col_group]
    got4 = K.embed_q4(K.pack_int4(codes4), K.block_scales(scales4), zeros.to(torch.uint8), group, k, idx.view(2, 2))
    assert torch.equal(got4, want4)
    for bad in (torch.tensor([n]), torch.tensor([-1])):
        with pytest.raises(IndexError, match=f"the table has {n} rows"):
            K.embed_q8(K.pack_int8(codes8), scales8, k, bad)
        with pytest.raises(IndexError, match=f"the table has {n} rows"):
            K.embed_q4(K.pack_int4(codes4), K.block_scales(scales4), zeros.to(torch.uint8), group, k, bad)


def test_quantize_x_is_round_to_nearest_per_block_of_32():
    x = torch.zeros(1, 40)
    x[0, 0], x[0, 1], x[0, 33] = 127.0, 0.5, -3.0      # block 0: d = 1 (0.5 rounds to even: 0); block 1: d = 3/127
    q = K.quantize_x(x)
    assert q[0, 0] == 127 and q[0, 1] == 0 and q[0, 33] == pytest.approx(-3.0) and q[0, 39] == 0


@needs_kernels
def test_the_library_is_built_once_and_reused(fresh_state):
    assert K.available()
    built = list((fresh_state / "cache" / "fishai" / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list(built[0].parent.glob("*.tmp"))
    mtime = built[0].stat().st_mtime_ns
    K.reset()
    assert K.available() and built[0].stat().st_mtime_ns == mtime
    assert K.status() == "FishAI AVX512-VNNI kernels"


def test_switched_off_the_layers_use_torch(fresh_state, monkeypatch):
    monkeypatch.setenv(K.ENV, "0")
    assert not K.available() and K.why() == f"{K.ENV}=0"
    assert K.status() == f"torch's kernels ({K.ENV}=0)"
    qt = quantize_rtn(torch.randn(64, 256), "q8")
    assert int8_linear(qt.codes, qt.scales, "cpu").kernel in ("torch", "")
    assert int4_linear(quantize_rtn(torch.randn(64, 256), "q4"), "cpu").mode in ("cpu", "dequant")


@pytest.mark.skipif("avx512_vnni" not in K._cpu_flags().split(), reason="the build is only tried on AVX512-VNNI CPUs")
def test_no_compiler_or_a_failing_one_is_one_line(fresh_state, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_state / "no-such-cc"))
    assert not K.available() and K.why() == f"no C compiler ({fresh_state / 'no-such-cc'}) to build them: install gcc"
    K.reset()
    broken = fresh_state / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\n"
                      "echo 'cpu_kernels.c:1: error: no such intrinsic' >&2; exit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    assert not K.available()
    assert K.why() == f"{broken} could not compile cpu_kernels.c: cpu_kernels.c:1: error: no such intrinsic"
    assert not [p for p in (fresh_state / "cache" / "fishai" / "kernels").iterdir()]   # no half-built file left
    assert "\n" not in K.status()


@needs_kernels
def test_half_linear_runs_the_kernel_for_a_few_rows_and_torch_for_many(monkeypatch):
    from quantized import F16_KERNEL_ROWS, HalfLinear
    w = (torch.randn(48, 96, generator=torch.Generator().manual_seed(7)) * 0.05).half()
    layer = HalfLinear(w)
    calls = []
    real = K.f16_mm
    monkeypatch.setattr(K, "f16_mm", lambda x, weight, n: calls.append(x.shape[0]) or real(x, weight, n))
    for m in (1, F16_KERNEL_ROWS - 1, F16_KERNEL_ROWS, 3 * F16_KERNEL_ROWS):
        x = torch.randn(m, 96)
        assert torch.allclose(layer(x), x @ w.float().T, rtol=1e-5, atol=1e-5)
    assert calls == [1, F16_KERNEL_ROWS - 1]
