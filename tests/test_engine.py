"""engine.py: the one decode engine - KV cache, prefill (whole and in chunks), the step at one
position per batch and at each row's own, hooks, sampling, the compiled static step."""
import pytest
import torch

import cpu_kernels
import engine
from engine import Engine, generate
from model import GPT, ModelConfig

from conftest import NET_SHAPE, tokens  # noqa: E402 (net: conftest's fixture)

CFG = ModelConfig(**NET_SHAPE)


def naive_greedy(net, x, n):
    for _ in range(n):
        logits, _ = net(x)
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


def test_prefill_chunks_and_decode_steps_match_the_full_forward(net):
    x = tokens(2, 40, 6)
    full, _ = net(x)
    eng = Engine(net, 2, 48)
    parts = [eng.step(x[:, :17], 0, last_only=False),        # prefill
             eng.step(x[:, 17:25], 17, last_only=False)]     # a second prefill chunk at an offset
    parts += [eng.step(x[:, i:i + 1], i)[:, None] for i in range(25, 40)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_rows_at_their_own_positions_match_each_row_alone(net):
    """serve.py's continuous batching: rows prefilled to different lengths decode in one step, each
    attending to its own past only; a row moved into another keeps its numbers."""
    x = tokens(3, 30, 3)
    full, _ = net(x)
    eng = Engine(net, 4)
    for r in range(3):
        eng.step(x[r:r + 1, :10 + 5 * r], 0, row=r)
    pos = torch.tensor([10, 15, 20])
    out = eng.step(x[torch.arange(3), pos][:, None], pos)
    for r in range(3):
        assert (out[r] - full[r, 10 + 5 * r]).abs().max() < 1e-5
    eng.move_row(2, 3, 21)  # the row's whole past moves with it
    nxt = eng.step(x[2:3, 21:22], 21, row=3)
    assert (nxt[0] - full[2, 21]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="do not fit"):
        eng.step(x[:, :2], 63)


def test_greedy_generation_equals_full_recompute(net):
    x = tokens(3, 7, 7)
    out = generate(net, x, 20, temperature=0)
    assert out.shape == (3, 27)
    assert torch.equal(out, naive_greedy(net, x, 20))
    # top_k=1 and a tiny top_p are greedy too
    assert torch.equal(generate(net, x, 20, temperature=0.8, top_k=1), out)
    assert torch.equal(generate(net, x, 20, temperature=0.8, top_p=1e-6), out)


def test_the_engine_is_kept_and_remade_when_the_model_changes(net):
    x = tokens(2, 6, 13)
    first = engine.engine_for(net, 2, 20)
    assert engine.engine_for(net, 1, 10) is first          # a smaller batch and length reuse it
    assert engine.engine_for(net, 3, 10) is not first      # a larger batch does not
    grown = engine.engine_for(net, 3, 10)
    net.to(torch.float64)                                  # new weights: a new engine, bound to them
    again = engine.engine_for(net, 3, 10)
    assert again is not grown and again.dtype == torch.float64
    net.to(torch.float32)
    assert torch.equal(generate(net, x, 8, temperature=0), naive_greedy(net, x, 8))
    engine.release(net)
    assert net not in engine._ENGINES


def test_hooks_and_swapped_in_layers_see_every_matmul(net):
    x = tokens(2, 9, 11)
    out = generate(net, x, 12, temperature=0)
    # a forward hook (GPTQ calibration, a profiler) must see every matmul: the modules are called
    seen = []
    h = net.layers[1].mlp.w_down.register_forward_hook(lambda m, i, o: seen.append(i[0].numel() // i[0].shape[-1] // 2))
    assert torch.equal(generate(net, x, 12, temperature=0), out)
    h.remove()
    assert seen == [9] + [1] * 11  # positions per row: the prefill, then every decode step, through the module

    # ...and so must a swapped-in layer that does more than its weight (a LoRA wrapper)
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    w = net.layers[0].attn.wq
    net.layers[0].attn.wq = Doubled(w.in_features, w.out_features, bias=False)
    net.layers[0].attn.wq.weight = w.weight
    assert torch.equal(generate(net, x, 12, temperature=0), naive_greedy(net, x, 12))


def test_sampling_is_seeded_and_eos_stops(net):
    x = tokens(4, 5, 8)
    a = generate(net, x, 15, temperature=1.0, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = generate(net, x, 15, temperature=1.0, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = generate(net, x, 15, temperature=0)
    eos = int(greedy[0, 8])  # the token row 0 emits at its 4th step
    out = generate(net, x, 15, temperature=0, eos_id=eos)
    row0 = out[0, 5:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])  # finished rows keep emitting eos
    # when every row has finished, decoding stops there: one row whose greedy reply is `eos` at step 4
    one = generate(net, x[:1], 15, temperature=0, eos_id=eos)
    assert one.shape[1] == 5 + first + 1 and int(one[0, -1]) == eos
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(net, x, CFG.max_seq_len, temperature=0)


def test_top_p_filtering_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(engine.sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert seen == {0, 1}
    seen = {int(engine.sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_static_step_matches_the_eager_step(net, monkeypatch):
    """The compiled path's step (whole cache, masked) as the engine runs it with compile=True; here
    eagerly (torch.compile is replaced by the identity: a CPU compile takes minutes)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    x = tokens(2, 6, 13)
    eng = Engine(net, 2, compile=True)
    assert eng.compiled is not None and eng.path == "compiled"
    assert torch.equal(eng.teacher_forced(naive_greedy(net, x, 12), 6).argmax(-1)[:, :-1],
                       naive_greedy(net, x, 12)[:, 6:])
    ref = Engine(net, 2).teacher_forced(naive_greedy(net, x, 12), 6)
    assert (eng.teacher_forced(naive_greedy(net, x, 12), 6) - ref).abs().max() < 1e-5
    assert torch.equal(generate(net, x, 12, temperature=0, compile=True), naive_greedy(net, x, 12))


def test_static_step_has_no_graph_breaks(net):
    eng = Engine(net, 2, 32)
    explain = torch._dynamo.explain(eng._static)(tokens(2, 1, 9), torch.tensor([3, 5]))
    assert explain.graph_break_count == 0, explain.break_reasons


def test_a_failed_compile_falls_back_to_eager_and_says_why(net, monkeypatch):
    def broken(fn, **kw):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    eng = Engine(net, 1, compile=True)
    assert eng.compiled is None and eng.path.startswith("eager (compiled failed: RuntimeError: no C++ compiler")
    x = tokens(1, 5, 2)
    assert torch.equal(eng.teacher_forced(naive_greedy(net, x, 4), 5).argmax(-1)[:, :-1], naive_greedy(net, x, 4)[:, 5:])


# --- CUDA (run on a GPU machine; skipped elsewhere) ------------------------------------------

def test_the_cpu_static_step_attends_kv_buckets(monkeypatch):
    """On a CPU the compiled step attends the next power of two from 64 past the newest position
    (one compile per bucket) instead of the whole context; the tokens are the eager ones."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    m = GPT(ModelConfig(**{**NET_SHAPE, "max_seq_len": 256})).eval()
    eng = Engine(m, 1, compile=True)
    assert not eng.graph_step and [eng._bucket(p) for p in (0, 63, 64, 127, 128, 255, 400)] == [
        64, 64, 128, 128, 256, 256, 256]
    ends, fn = [], eng.compiled.fn
    eng.compiled.fn = lambda tok, pos, end=None: ends.append(end) or fn(tok, pos, end)
    x = tokens(1, 6, 3)
    got = torch.stack(list(eng.stream(x, 150, temperature=0)), dim=1)
    assert torch.equal(got, naive_greedy(m, x, 150)[:, 6:])
    assert sorted(set(ends)) == [64, 128, 256] and ends[0] == 64 and ends[-1] == 256


@pytest.mark.skipif(not cpu_kernels.available(), reason=f"FishAI's CPU kernels do not run here: {cpu_kernels.why()}")
def test_the_static_step_of_a_bin_on_fishai_kernels_traces_whole(formats):
    """The kernels are torch custom ops inside a compiled step: no graph break for any .bin kind."""
    for m in (formats["int8"], formats["int4"], formats["mixed"], formats["fp16"]):
        eng = Engine(m, 2, 64)
        explain = torch._dynamo.explain(eng._static)(tokens(2, 1, 9), torch.tensor([3, 5]), 64)
        assert explain.graph_break_count == 0, explain.break_reasons


def cuda(fn):
    """pytest -m cuda selects it; hard-wired to the GPU, so it skips without one (even in the CPU dry run)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


@cuda
def test_cuda_engine_matches_full_forward_in_bf16():
    torch.manual_seed(0)
    m = GPT(CFG).cuda().to(torch.bfloat16).eval()
    x = tokens(2, 48, 22).cuda()
    full, _ = m(x)
    eng = Engine(m, 2, 64)
    parts = [eng.step(x[:, :40], 0, last_only=False)] + [eng.step(x[:, i:i + 1], i)[:, None] for i in range(40, 48)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 0.1  # bf16 tolerance


@cuda
def test_cuda_compiled_graph_step_matches_eager():
    torch.manual_seed(0)
    m = GPT(CFG).cuda().eval()
    x = tokens(2, 32, 23).cuda()
    expected = Engine(m, 2).teacher_forced(x, 8)  # (greedy text on random weights flips at near-ties)
    eng = Engine(m, 2, compile=True)
    assert eng.path == "compiled + CUDA graph"
    assert (eng.teacher_forced(x, 8) - expected).abs().max() <= 1e-4 * expected.abs().max()


# --- batch invariance (serve.py --deterministic) -----------------------------------------------

@pytest.fixture(scope="module")
def formats(tmp_path_factory, trained_ckpt):
    """The trained fixture model as each file kind a server runs: .pt, int8, int4, mixed and fp16 .bin."""
    import quantize
    from model import load_model
    out = tmp_path_factory.mktemp("formats")
    models = {"pt": load_model(trained_ckpt)}
    for strategy in ("int8", "int4", "mixed", "fp16"):
        path = out / f"m-{strategy}.bin"
        assert quantize.main(["--model", str(trained_ckpt), "--output", str(path), "--strategy", strategy,
                              "--quiet"]) == 0
        models[strategy] = load_model(path)
    return models


def _alone_and_batched(m, invariant: bool, n: int = 12) -> tuple[list, list]:
    """Greedy continuations of 8 prompts of different lengths: each alone (one row), and all 8 as
    serving rows at their own positions in one batch."""
    tok = m.tokenizer
    prompts = [tok.encode(t) for t in ("The history of", "In 1905, the", "A small village in the north",
                                       "The company announced", "During the war,", "Scientists have found that",
                                       "The river", "Music is one of the")]
    alone = []
    for p in prompts:
        eng, ids = Engine(m, 1, batch_invariant=invariant), []
        logits = eng.step(torch.tensor([p]), 0)
        for i in range(n):
            ids.append(int(logits.argmax(-1)))
            logits = eng.step(torch.tensor([[ids[-1]]]), len(p) + i)
        alone.append(ids)
    eng = Engine(m, 8, batch_invariant=invariant)
    logits = torch.cat([eng.step(torch.tensor([p]), 0, row=r) for r, p in enumerate(prompts)])
    pos, batched = torch.tensor([len(p) for p in prompts]), [[] for _ in prompts]
    for _ in range(n):
        nxt = logits.argmax(-1)
        for r in range(8):
            batched[r].append(int(nxt[r]))
        logits, pos = eng.step(nxt[:, None], pos), pos + 1
    return alone, batched


@pytest.mark.parametrize("fmt", ["pt", "int8", "int4", "mixed", "fp16"])
def test_batch_invariant_rows_give_what_they_give_alone(formats, fmt):
    alone, batched = _alone_and_batched(formats[fmt], invariant=True)
    assert batched == alone


def _teacher_forced_rows(m, invariant: bool) -> tuple[list, torch.Tensor]:
    """Logits of 6 teacher-forced decode steps after 8 prompts of different lengths: each row alone
    [(6, V)], and the 8 as serving rows at their own positions in one batch (8, 6, V)."""
    g = torch.Generator().manual_seed(0)
    V = m.config.vocab_size
    seqs = [torch.randint(0, V, (1, 6 + 3 * r), generator=g) for r in range(8)]
    cont = torch.randint(0, V, (8, 6), generator=g)
    alone = []
    for r, p in enumerate(seqs):
        eng = Engine(m, 1, batch_invariant=invariant)
        eng.step(p, 0)
        alone.append(torch.stack([eng.step(cont[r:r + 1, i:i + 1], p.shape[1] + i)[0] for i in range(6)]))
    eng = Engine(m, 8, batch_invariant=invariant)
    for r, p in enumerate(seqs):
        eng.step(p, 0, row=r)
    pos, batched = torch.tensor([p.shape[1] for p in seqs]), []
    for i in range(6):
        batched.append(eng.step(cont[:, i:i + 1], pos))
        pos = pos + 1
    return alone, torch.stack(batched, 1)


def test_batch_invariant_logits_are_bitwise_those_of_a_row_alone(formats):
    """Teacher-forced on the same tokens, every format: batch_invariant's rows give bitwise the
    logits of their lone runs (the default's may differ for a .pt: sgemm depends on how many rows
    it multiplies; benchmark.py serve measures by how much)."""
    for fmt, m in formats.items():
        alone, batched = _teacher_forced_rows(m, invariant=True)
        for r in range(8):
            assert torch.equal(batched[r], alone[r]), (fmt, r)


# --- the decode trunk (cpu_kernels.DecodeTrunk: a .bin's blocks in one C call) ----------------

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="FishAI's CPU kernels do not run here")


@needs_kernels
def test_a_bin_decodes_through_the_trunk_and_a_pt_or_a_hooked_model_does_not(formats):
    for fmt in ("int8", "int4", "mixed", "fp16"):
        assert Engine(formats[fmt], 1).trunk is not None, fmt
    assert Engine(formats["pt"], 1).trunk is None              # torch's fp32 matmuls: the torch step
    m = formats["int4"]
    hook = m.layers[0].attn.wo.register_forward_hook(lambda *a: None)
    try:  # a hook must see every matmul: the torch step calls the modules
        assert Engine(m, 1).trunk is None
    finally:
        hook.remove()


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "int4", "mixed", "fp16"])
def test_the_trunk_step_matches_the_torch_step(formats, fmt):
    """Rows at their own positions on cache rows 1..3 (prefilled by the trunk too: prompts of 5-14
    tokens): the trunk's logits and the keys and values it writes against the torch step on the
    same kernels. fp16 (fp32 math in both) to fp32
    rounding; int8/int4 within the activations' int8 rounding, which a last-bit difference in a
    norm can move by one step (the same greedy tokens)."""
    m, g = formats[fmt], torch.Generator().manual_seed(1)
    V = m.config.vocab_size
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (5, 9, 14)]
    cont = torch.randint(0, V, (3, 5), generator=g)
    fast, ref = Engine(m, 4), Engine(m, 4)
    ref.trunk = None
    for r, p in enumerate(prompts):
        fast.step(p, 0, row=r + 1)
        ref.step(p, 0, row=r + 1)
    pos = torch.tensor([p.shape[1] for p in prompts])
    for i in range(5):
        a, b = fast.step(cont[:, i:i + 1], pos, row=1), ref.step(cont[:, i:i + 1], pos, row=1)
        tol = 1e-5 if fmt == "fp16" else 5e-2
        assert (a - b).abs().max() <= tol * b.abs().max(), (fmt, i)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        pos = pos + 1
    for kf, kr in zip(fast.k + fast.v, ref.k + ref.v):
        assert torch.equal(kf[0], kr[0]) and not kf[0].any()     # row 0 untouched
        assert (kf - kr).abs().max() <= (1e-5 if fmt == "fp16" else 5e-2) * kr.abs().max()
    with pytest.raises(ValueError, match="outside the KV cache"):
        fast.trunk(torch.zeros(1, m.config.d_model), torch.tensor([fast.length]), torch.tensor([0]))
    with pytest.raises(ValueError, match="do not fit"):
        fast.trunk(torch.zeros(1, m.config.d_model), torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(ValueError, match="need as many positions"):
        fast.trunk(torch.zeros(2, m.config.d_model), torch.tensor([0]), torch.tensor([0, 1]))


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "int4", "mixed", "fp16"])
def test_the_default_decode_of_a_bin_is_bitwise_the_same_alone_or_batched(formats, fmt):
    """The trunk computes each row on its own (its norms, its int8 activations, its attention):
    without batch_invariant a .bin's rows give bitwise what they give alone."""
    alone, batched = _teacher_forced_rows(formats[fmt], invariant=False)
    for r in range(8):
        assert torch.equal(batched[r], alone[r]), r


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads,d_model", [(6, 2, 96), (4, 4, 64), (4, 2, 96), (2, 1, 48)])
def test_the_trunk_takes_any_head_grouping_and_head_size(tmp_path, heads, kv_heads, d_model):
    """Query heads per KV head 3 (a pair and a single), 1 (plain multi-head) and 2; head sizes 16
    and 24 (not a multiple of 16: the plain loops): the trunk's logits are the torch step's (fp16
    .bin: fp32 math in both) for prefill pieces (every position) and rows at their own positions,
    past the 4-position blocks."""
    import quantize as Q
    from model import load_model
    from quantized import write_quantized
    cfg = ModelConfig(vocab_size=256, d_model=d_model, n_layers=2, n_heads=heads, n_kv_heads=kv_heads, d_ff=128,
                      max_seq_len=64)
    torch.manual_seed(0)
    tensors, _ = Q.quantize_model(GPT(cfg).eval(), "fp16", progress=False)
    write_quantized(tmp_path / "m.bin", tensors, cfg.to_dict())
    m = load_model(tmp_path / "m.bin")
    fast, ref = Engine(m, 3), Engine(m, 3)
    ref.trunk = None
    assert fast.trunk is not None
    g = torch.Generator().manual_seed(2)
    for r, n in enumerate((3, 7, 18)):  # prefilled in two pieces, every position's logits
        p = torch.randint(0, 256, (1, n), generator=g)
        for lo, hi in ((0, 2), (2, n)):
            a, b = fast.step(p[:, lo:hi], lo, row=r, last_only=False), ref.step(p[:, lo:hi], lo, row=r, last_only=False)
            assert a.shape == b.shape == (1, hi - lo, 256) and (a - b).abs().max() <= 1e-5 * b.abs().max()
    pos = torch.tensor([3, 7, 18])
    for i in range(6):
        tok = torch.randint(0, 256, (3, 1), generator=g)
        a, b = fast.step(tok, pos), ref.step(tok, pos)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), i
        pos = pos + 1


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_rows_and_a_prefill_piece_in_one_call_are_what_they_are_apart(formats, fmt):
    """Engine.step_tokens (serve.py's mixed turn): rows 0 and 1 decoding at their own positions and
    7 prompt tokens of row 2 in one trunk call give bitwise the logits and the keys and values of a
    decode step and a prefill piece run apart. A .pt engine has no trunk to do it."""
    m, g = formats[fmt], torch.Generator().manual_seed(3)
    V = m.config.vocab_size
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (6, 11, 12)]
    nxt = torch.randint(0, V, (2, 1), generator=g)
    fused, apart = Engine(m, 4), Engine(m, 4)
    for e in (fused, apart):  # rows 0 and 1 prefilled whole, row 2 its first 5 tokens
        e.step(prompts[0], 0, row=0), e.step(prompts[1], 0, row=1), e.step(prompts[2][:, :5], 0, row=2)
    pos = [6, 11]
    piece = prompts[2][0, 5:].tolist()
    got = fused.step_tokens(nxt.view(-1).tolist() + piece, pos + list(range(5, 12)), [0, 1] + [2] * 7, [0, 1, 8])
    want_rows = apart.step(nxt, torch.tensor(pos))
    want_piece = apart.step(prompts[2][:, 5:], 5, row=2)
    assert torch.equal(got[:2], want_rows) and torch.equal(got[2:], want_piece)
    for a, b in zip(fused.k + fused.v, apart.k + apart.v):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        fused.step(nxt[:1], fused.length, row=0)
    with pytest.raises(RuntimeError, match="needs the C decode trunk"):
        Engine(formats["pt"], 2).step_tokens([1], [0], [0])


@needs_kernels
def test_the_trunk_gives_the_same_bits_on_one_or_two_threads(formats):
    """Two threads split the kernels' row blocks and the attention's (row, head pair)s: each output
    is still computed by one thread in one order."""
    m, threads = formats["int4"], torch.get_num_threads()
    x = tokens(3, 20, 4)
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            eng = Engine(m, 3)
            eng.step(x[:, :12], 0)
            outs.append(torch.stack([eng.step(x[:, i:i + 1], i) for i in range(12, 20)]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_kernels
def test_the_trunk_takes_unfused_matmuls_whose_rows_are_not_a_multiple_of_16(tmp_path):
    """A mixed .bin keeps q/k (int8) and v (int4) apart, and a 24-wide k or v is not a whole block of
    16 rows: each matmul writes exactly its own columns of the q | k | v row."""
    import quantize as Q
    from model import load_model
    from quantized import write_quantized
    cfg = ModelConfig(vocab_size=256, d_model=48, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=128, max_seq_len=64)
    torch.manual_seed(0)
    tensors, _ = Q.quantize_model(GPT(cfg).eval(), "mixed", progress=False)
    write_quantized(tmp_path / "m.bin", tensors, cfg.to_dict())
    m = load_model(tmp_path / "m.bin")
    assert getattr(m.layers[0].attn, "fused_wq_wk_wv", None) is None and m.layers[0].attn.wk.out_features == 24
    fast, ref = Engine(m, 1), Engine(m, 1)
    ref.trunk = None
    assert fast.trunk is not None
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    a = torch.stack([fast.step(x[:, i:i + 1], i) for i in range(20)])
    b = torch.stack([ref.step(x[:, i:i + 1], i) for i in range(20)])
    assert (a - b).abs().max() <= 5e-2 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
