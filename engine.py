"""
The one decode engine: the KV cache, prefill, one step and sampling. Every script that decodes
(generate.py, serve.py, scoring.py for evaluate.py and benchmark.py, train.py's samples) runs
through it; model.GPT keeps construction, the training forward and the loss.

    from engine import Engine, generate
    eng = Engine(model, batch=1)              # KV cache over the model's context
    logits = eng.step(prompt, 0)              # prefill: (B, T) tokens at positions 0..T-1 -> (B, V)
    logits = eng.step(next_tok[:, None], T)   # one decode step
    out = generate(model, idx, 32, temperature=0)   # (B, T + 32) tokens

One step function serves a batch-1 decode, a batch, a prefill (whole or in chunks) and serving
rows at their own positions: step(tokens (B, T), start, row=0) writes and attends KV-cache rows
row..row+B-1, where `start` is an int (every row at start..start+T-1) or a (B,) tensor (each row
at its own positions, masked to its own past: serve.py's continuous batching). It calls the
model's matmuls directly (F.linear on a stock weight, a quantized layer's forward, the fused
QKV and gate/up matmuls install_runtime_layers makes for a .bin), so per token it costs the
math and little else; with hooks on any layer (GPTQ calibration, a profiler) it calls the
modules instead, so the hooks see every matmul. A decode step of a .bin whose every matmul runs on
FishAI's CPU kernels goes further: all its blocks run in one C call (cpu_kernels.DecodeTrunk, the
same math, each row on its own), ~2x the torch step at batch 1; so does a prefill piece of one row
of up to TRUNK_PREFILL tokens (its tokens as rows of x on that cache row). Engine.step_tokens takes
any tokens at any (cache row, position) in one such call: serve.py's turn of decode rows and a
prefill piece of another row together.

compile=True (the CUDA default, fast_decode_default) also builds a static step: the same step
over the whole cache with a mask, so its shapes never change; torch.compile'd and, on CUDA,
captured once as a CUDA graph and replayed (one launch per token, the gpt-fast recipe). On a CPU
(no graph) it attends the KV length in power-of-two buckets from 64 instead, one compile each. Where a
stage fails the next runs (compiled + graph, eager + graph, compiled, eager); Engine.path names
what runs and why. An engine with the C decode trunk builds no compiled step: on a CPU the trunk
is faster than any compiled step of torch ops (docs/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from functools import partial
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import cpu_kernels
from model import apply_rope

# -----------------------------------------------------------------------------------------------
# sampling and prompt fitting


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


def fast_decode_default(device) -> bool:
    """Whether scripts decode through the compiled CUDA-graph step by default: on CUDA (launch-bound
    otherwise), not on a CPU (compiling takes longer than the decoding it saves there)."""
    return torch.device(device).type == "cuda"


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic garbage collector off, then back as it was. A decode step makes hundreds of
    short-lived tensors and no reference cycles, and the collections they trigger cost ~10% of a
    batch-1 step (measured: small, int4, CPU)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class StaticDecodeStep:
    """A decode step with its own input buffers (tokens, positions): every call copies into them, so
    a compiled step always sees the same tensors (no guard failure, no recompile). With
    cuda_graph=True it is captured once as a CUDA graph and replayed; its output buffer holds the
    logits until the next replay (callers copy)."""

    def __init__(self, fn, tok: torch.Tensor, pos: torch.Tensor, cuda_graph: bool = False, warmup: int = 3,
                 first_end: int | None = None):
        self.fn, self.tok, self.pos, self.graph = fn, tok, pos, None
        if not cuda_graph:
            fn(tok, pos, first_end)  # compiles (the first KV bucket) now, so that a failure shows here
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

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, end: int | None = None) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        if self.graph is None:
            return self.fn(self.tok, self.pos, end)
        self.graph.replay()
        return self.out.clone()


# -----------------------------------------------------------------------------------------------
# the engine

# a layer whose forward is all it does (stock modules, and the quantized layers, which declare
# lean_decode = True) can be called through its forward or F.linear directly
_STOCK = (nn.Embedding, nn.Linear)
STATIC_MIN_BUCKET = 64  # the smallest KV length a compiled CPU step attends (see Engine._bucket)


# prefill pieces of up to this many tokens (of one row) run through the C decode trunk too: faster
# than the torch step at every size measured up to 512 (a short piece's torch ops cost more than its
# math: tiny at position 1000, 4 tokens 0.7 ms against 1.9; small, 256 tokens 100 ms against 121);
# longer prompts keep torch's fused attention (docs/RESULTS.md)
TRUNK_PREFILL = 256


def _kernel_spec(m):
    """m's matmul as cpu_kernels.DecodeTrunk calls it, or None when m does not run on FishAI's kernels."""
    spec = getattr(m, "kernel_spec", None)
    return spec() if spec is not None else None


def _hooked(model) -> bool:
    from torch.nn.modules import module as nn_module
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules()))


def _call(m, hooked: bool):
    """The cheapest exact way to run module m: F.linear on a stock weight, a lean layer's forward,
    or the module call itself (hooks, or a layer that does more than its forward)."""
    if hooked or not (type(m) in _STOCK or getattr(type(m), "lean_decode", False)):
        return m
    if type(m) is nn.Linear:
        return partial(F.linear, weight=m.weight)
    if type(m) is nn.Embedding:
        return partial(F.embedding, weight=m.weight)
    return m.forward


def _group(parent, names, hooked: bool):
    """The outputs of parent's linears `names` for one input side by side (..., sum of their
    widths): one matmul when install_runtime_layers fused them (parent.fused_<names>), else one
    call each, concatenated."""
    fused = None if hooked else getattr(parent, "fused_" + "_".join(names), None)
    if fused is not None:
        return fused.forward
    fns = [_call(getattr(parent, n), hooked) for n in names]
    return lambda h: torch.cat([g(h) for g in fns], dim=-1)


def _row_by_row(f):
    """f applied to each row of a batch on its own (M = 1 per matmul): a kernel whose result for a
    row depends on how many rows come with it (torch's CPU int4 kernel, sgemm against sgemv) then
    gives every row exactly what it gives alone (Engine(batch_invariant=True))."""
    def each(h):
        if h.shape[0] == 1:
            return f(h)
        return torch.cat([f(h[i:i + 1]) for i in range(h.shape[0])])
    return each


def _past_mask(pos: torch.Tensor, end: int) -> torch.Tensor:
    """(B, 1, T, end) bool: the query at pos[b, t] sees cache positions 0..pos[b, t], its own past."""
    return (torch.arange(end, device=pos.device) <= pos[..., None])[:, None]


def _weights_key(model) -> tuple:
    """What an engine's bound weights depend on: a moved or re-cast model gets a new engine."""
    w = model.norm.weight
    return (w.data_ptr(), w.dtype, w.device, model.tok_emb.weight.data_ptr(), _hooked(model))


class Engine:
    """Decoding for one model: a KV cache of `batch` rows x `length` positions (default: the
    model's context) in `dtype` (default: the model's; under autocast, its dtype), the step, and,
    with compile=True, the static compiled step for decoding (see the module docstring).
    batch_invariant=True runs every matmul one row at a time, so that a row's logits are bitwise
    those it gets alone (serve.py --deterministic; on torch's matmuls it costs about half of batch-8
    throughput, docs/RESULTS.md). A .bin on FishAI's CPU kernels needs none of it: the kernels and
    the decode trunk give a row the same bits whatever rows come with it."""

    def __init__(self, model, batch: int = 1, length: int | None = None, dtype=None, compile: bool = False,
                 cuda_graph: bool | None = None, batch_invariant: bool = False):
        c = model.config
        self.model, self.config, self.batch = model, c, int(batch)
        self.length = min(length or c.max_seq_len, c.max_seq_len)
        device = model.norm.weight.device
        if dtype is None and torch.is_autocast_enabled(device.type):  # the cache holds what autocast computes
            dtype = torch.get_autocast_dtype(device.type)
        self.dtype, self.device = dtype or model.norm.weight.dtype, device
        shape = (self.batch, c.n_kv_heads, self.length, c.head_dim)
        with torch.inference_mode(False):  # plain tensors, so a compiled step is never re-traced for them
            self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(c.n_layers)]
            self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(c.n_layers)]
        self.key, self.batch_invariant = _weights_key(model), batch_invariant
        self._bind(model)
        self.compiled, self.path, self.graph_step = None, "eager", False
        if self.trunk is not None:  # a compiled step of torch ops would be slower (docs/RESULTS.md)
            self.path = "eager, blocks in one C call (cpu_kernels.DecodeTrunk)" + (
                ": no compile needed on a CPU" if compile else "")
        elif compile:
            self._build_static(cuda_graph)

    def _bind(self, model) -> None:
        hooked = _hooked(model)
        self.embed = _call(model.tok_emb, hooked)
        self.head = (partial(F.linear, weight=model.tok_emb.weight) if model.lm_head is None
                     else _call(model.lm_head, hooked))
        self.layers = [(b.attn_norm.weight, _group(b.attn, ("wq", "wk", "wv"), hooked), _call(b.attn.wo, hooked),
                        b.mlp_norm.weight, _group(b.mlp, ("w_gate", "w_up"), hooked), _call(b.mlp.w_down, hooked))
                       for b in model.layers]
        self.norm, self.cos, self.sin = model.norm.weight, model.rope_cos, model.rope_sin
        # a decode step rotates q and k in one go, as x * cos2 + roll(x, hd/2) * sin2 with
        # cos2 = (cos, cos), sin2 = (-sin, sin): model.apply_rope's arithmetic in 3 ops, not 2 x 8
        self.cos2, self.sin2 = torch.cat([self.cos, self.cos], -1), torch.cat([-self.sin, self.sin], -1)
        self.trunk = None if hooked else self._decode_trunk(model)
        # FishAI's kernels give a row the same bits whatever rows come with it: only torch's matmuls
        # (sgemm, the int4pack kernel) need to run one row at a time for batch invariance
        on_kernels = self.trunk is not None and _kernel_spec(model.lm_head) is not None
        if self.batch_invariant and not on_kernels:
            self.head = _row_by_row(self.head)
            self.layers = [(an, _row_by_row(qkv), _row_by_row(wo), mn, _row_by_row(gu), _row_by_row(down))
                           for an, qkv, wo, mn, gu, down in self.layers]

    def _decode_trunk(self, model):
        """cpu_kernels.DecodeTrunk when every matmul of every block runs on FishAI's CPU kernels (a
        .bin on a CPU with them; fp32 activations and cache): a decode step's blocks then run in one
        C call, not ~25 torch ops and 4 Python calls each. None otherwise (the torch step runs)."""
        if (self.device.type != "cpu" or self.dtype is not torch.float32 or model.norm.weight.dtype is not torch.float32
                or not cpu_kernels.available()):
            return None

        def specs(parent, names):
            fused = getattr(parent, "fused_" + "_".join(names), None)
            out = [_kernel_spec(m) for m in ([fused] if fused is not None else [getattr(parent, n) for n in names])]
            return None if None in out else out

        layers = []
        for b in model.layers:
            qkv, gate_up = specs(b.attn, ("wq", "wk", "wv")), specs(b.mlp, ("w_gate", "w_up"))
            wo, down = specs(b.attn, ("wo",)), specs(b.mlp, ("w_down",))
            if None in (qkv, gate_up, wo, down):
                return None
            layers.append({"attn_norm": b.attn_norm.weight, "mlp_norm": b.mlp_norm.weight, "qkv": qkv,
                           "wo": wo[0], "gate_up": gate_up, "down": down[0]})
        return cpu_kernels.DecodeTrunk(self.config, layers, self.k, self.v, self.cos.contiguous(),
                                       self.sin.contiguous(), model.norm.weight, self.config.norm_eps)

    # --- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, start, row: int = 0, last_only: bool = True) -> torch.Tensor:
        """Run (B, T) tokens through the model on KV-cache rows row..row+B-1 and return float logits
        of each row's last position (B, V), or of every position (B, T, V). start: an int (every row
        at start..start+T-1) or a (B,) LongTensor (each row at its own positions)."""
        B, T = tokens.shape
        if self.trunk is not None and (T == 1 or (B == 1 and T <= TRUNK_PREFILL)):
            # the blocks in one C call: a decode step (B rows at their positions), or a short prefill
            # piece of one row (its T tokens as T rows of x on that cache row, each at its position);
            # no mask or index tensors to build, the trunk attends each row's own past
            first = start.reshape(-1).tolist() if torch.is_tensor(start) else [int(start)] * B
            pos, rows = ((first, list(range(row, row + B))) if T == 1 else
                         (list(range(first[0], first[0] + T)), [row] * T))
            self._check_fits(row, B, max(pos))
            logits = self.step_tokens(tokens.reshape(-1), pos, rows, [B * T - 1] if T > 1 and last_only else None)
            return logits if last_only else logits.view(B, T, -1)
        if self.compiled is not None and T == 1 and row == 0 and B == self.batch and last_only:
            pos = start if torch.is_tensor(start) else torch.full((B,), int(start), device=tokens.device)
            newest = self.length - 1 if self.graph_step else int(start.max() if torch.is_tensor(start) else start)
            return self.compiled(tokens, pos, self._bucket(newest))
        if torch.is_tensor(start):
            pos = start.view(B, 1) + torch.arange(T, device=tokens.device)
            end = int(pos.max()) + 1
            mask, causal = _past_mask(pos, end), False
        else:
            pos, end = int(start), int(start) + T
            mask, causal = None, T > 1
            if causal and start > 0:  # a prefill chunk after earlier ones: its own past only
                mask, causal = _past_mask(torch.arange(start, end, device=tokens.device).expand(B, T), end), False
        self._check_fits(row, B, end - 1)
        return self._forward(tokens, pos, end, mask, causal, slice(row, row + B), last_only)

    def _check_fits(self, row: int, B: int, last: int) -> None:
        if last >= self.length or row + B > self.batch:
            raise ValueError(f"KV cache of {self.batch} rows x {self.length} positions: rows {row}..{row + B - 1} "
                             f"up to position {last} do not fit")

    @torch.inference_mode()
    def step_tokens(self, tokens, positions: list, rows: list, out: list | None = None) -> torch.Tensor:
        """Tokens (a list or (N,) tensor) each at its own position of its own cache row, in one call
        of the C decode trunk: a decode step, a prefill piece, or serve.py's decode rows and a piece of
        another row together (vLLM's mixed batches; a piece's tokens share a row at consecutive
        positions, each attending its own past). Returns float logits (len(out), V) of the tokens at
        indices `out` (default: all). Only with the trunk (self.trunk is not None)."""
        if self.trunk is None:
            raise RuntimeError("Engine.step_tokens needs the C decode trunk (a .bin on FishAI's CPU kernels)")
        tokens = tokens if torch.is_tensor(tokens) else torch.tensor(tokens, dtype=torch.long)
        x = self.embed(tokens).float().contiguous()
        h = self.trunk(x, torch.tensor(positions), torch.tensor(rows))
        return self.head(h if out is None else h[out]).float()

    def _bucket(self, last: int) -> int:
        """The KV length a compiled step attends for a newest position `last`: the whole cache for a
        CUDA graph (one capture), else the next power of two from 64 (a compile per bucket: the CPU
        step then attends over at most twice the positions it needs, not the whole context)."""
        if self.graph_step:
            return self.length
        return min(self.length, max(STATIC_MIN_BUCKET, 1 << max(0, last).bit_length()))

    def _static(self, tokens: torch.Tensor, start: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """The step with fixed shapes for torch.compile / CUDA graphs: (B, 1) tokens at (B,)
        positions, attention over the first `end` cache positions (default: all) with a mask."""
        pos, end = start.view(-1, 1), end or self.length
        return self._forward(tokens, pos, end, _past_mask(pos, end), False, slice(0, tokens.shape[0]), True)

    def _forward(self, tokens, pos, end: int, mask, causal: bool, rows: slice, last_only: bool):
        """The math of one step. pos: an int (positions pos..pos+T-1 of every row: slices) or (B, T)
        positions (gathers, masked attention); mask (B, 1, T, end) bool or None. A decode step
        (T = 1) keeps x (B, d), so (B, H*hd) -> (B, H, 1, hd) is a free view: at batch 1 on a CPU
        every op saved counts (~2 us each, x 6 layers x ~25 ops)."""
        B, T = tokens.shape
        c = self.config
        H, KV, hd, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
        rep, one = H // KV, T == 1
        x = self.embed(tokens.view(B) if one else tokens)
        table = (self.cos2, self.sin2) if one else (self.cos, self.sin)
        if torch.is_tensor(pos):
            cos, sin = table[0][pos][:, None], table[1][pos][:, None]
        else:
            cos, sin = table[0][pos:pos + T], table[1][pos:pos + T]
        qk_width, half = (H + KV) * hd, hd // 2
        write = self._writer(pos, rows, B, T, tokens.device)
        if mask is not None and rep > 1:  # the fused kernels take GQA or a mask, not both: a KV head's
            mask = mask[:, :, None].expand(B, 1, rep, T, end).reshape(B, 1, rep * T, end)  # queries as its rows

        def heads(t, n):  # (B, T, n * hd) -> (B, n, T, hd)
            return t.view(B, T, n, hd).transpose(1, 2)

        for (an, qkv, wo, mn, gate_up, down), kc, vc in zip(self.layers, self.k, self.v):
            h = F.rms_norm(x, an.shape, an, eps)
            qkv_out = qkv(h)
            if one:  # (B, (H + 2 KV) hd): q and k rotated together as (B, H + KV, 1, hd)
                if cos.dtype != qkv_out.dtype:  # (apply_rope's cast: autocast's matmuls give bf16)
                    cos, sin = cos.to(qkv_out.dtype), sin.to(qkv_out.dtype)
                qk = qkv_out[:, :qk_width].view(B, H + KV, 1, hd)
                qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
                q, k, v = qk[:, :H], qk[:, H:], qkv_out[:, qk_width:].view(B, KV, 1, hd)
            else:
                q, k, v = qkv_out.split([H * hd, KV * hd, KV * hd], dim=-1)
                q, k, v = apply_rope(heads(q, H), cos, sin), apply_rope(heads(k, KV), cos, sin), heads(v, KV)
            if k.dtype != kc.dtype:
                k, v, q = k.to(kc.dtype), v.to(kc.dtype), q.to(kc.dtype)
            write(kc, k)
            write(vc, v)
            y = self._attend(q, kc[rows, :, :end], vc[rows, :, :end], mask, causal, pos)
            y = y.reshape(B, H * hd) if one else y.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
            x = x + wo(y if y.dtype == x.dtype else y.to(x.dtype))
            h = F.rms_norm(x, mn.shape, mn, eps)
            g, u = gate_up(h).chunk(2, dim=-1)
            x = x + down(F.silu(g) * u)
        if not one and last_only:
            x = x[:, -1]
        logits = self.head(F.rms_norm(x, self.norm.shape, self.norm, eps)).float()
        return logits[:, None] if one and not last_only else logits

    @staticmethod
    def _writer(pos, rows: slice, B: int, T: int, device):
        """How a step writes its (B, heads, T, hd) keys or values into the cache: a slice at int
        positions, else an index_put at each row's own."""
        if not torch.is_tensor(pos):
            def write(cache, t):
                cache[rows, :, pos:pos + T] = t
        elif T == 1:
            r, p = torch.arange(rows.start, rows.stop, device=device), pos.view(B)

            def write(cache, t):
                cache[r, :, p] = t.view(B, t.shape[1], t.shape[3])
        else:
            r = torch.arange(rows.start, rows.stop, device=device)[:, None]

            def write(cache, t):
                cache[r, :, pos] = t.transpose(1, 2)
        return write

    def _attend(self, q, keys, values, mask, causal: bool, pos):
        """Attention of q (B, H, T, hd) over the rows' cached keys and values (B, KV, end, hd)."""
        B, H, T, hd = q.shape
        KV = keys.shape[1]
        if self.batch_invariant and mask is not None and T == 1:  # each row's attention as it runs alone
            return torch.cat([F.scaled_dot_product_attention(q[b:b + 1], keys[b:b + 1, :, :int(pos[b, 0]) + 1],
                                                             values[b:b + 1, :, :int(pos[b, 0]) + 1],
                                                             enable_gqa=H != KV) for b in range(B)])
        if mask is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=causal, enable_gqa=H != KV)
        return F.scaled_dot_product_attention(q.reshape(B, KV, H // KV * T, hd), keys, values, attn_mask=mask)

    # --- the compiled static step -----------------------------------------------------------------

    def _build_static(self, cuda_graph: bool | None) -> None:
        graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        # dynamo keeps one cache of traces for _static's code, shared by every engine: past its
        # recompile limit it would silently run eagerly, so each engine starts from a fresh one
        torch._dynamo.reset()
        plans = [(True, True), (False, True), (True, False)] if graph else [(True, False)]
        why = []
        for compiled, captured in plans:
            try:
                self.compiled = self._static_step(compiled, captured)
            except Exception as e:  # noqa: BLE001 - named in self.path, the next plan runs
                why.append(f"{'compiled' if compiled else 'eager'}{' + CUDA graph' if captured else ''} failed: "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
                continue
            self.path = ("compiled" if compiled else "eager static") + (" + CUDA graph" if captured else "")
            break
        else:
            self.path = "eager"
        if why:
            self.path += " (" + "; ".join(why) + ")"

    @torch.inference_mode()
    def _static_step(self, compiled: bool, captured: bool) -> StaticDecodeStep:
        """One plan, run once (compiles, captures) so that it fails here if it fails at all. Its
        warm-up steps write position 0 of the cache, which every prefill overwrites."""
        fn = torch.compile(self._static, fullgraph=True, dynamic=False) if compiled else self._static
        tok = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.graph_step = captured
        return StaticDecodeStep(fn, tok, pos, cuda_graph=captured, first_end=self._bucket(0))

    # --- rows and whole generations ---------------------------------------------------------------

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of cache row src into row dst: a finished request's row
        refilled with the last active one keeps the active rows at 0..n-1 (one slice per step)."""
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]

    @torch.inference_mode()
    def stream(self, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, eos_id=None,
               generator=None) -> Iterator[torch.Tensor]:
        """Yield the (B,) next tokens one step at a time. Rows that produced eos_id keep producing
        eos_id; stops when every row is done."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"context of {self.config.max_seq_len}: shorten the prompt or lower max_new_tokens")
        if max_new_tokens <= 0:
            return
        logits = self.step(idx, 0)
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
                logits = self.step(nxt[:, None], T + i)

    @torch.inference_mode()
    def teacher_forced(self, idx, prompt_len: int) -> torch.Tensor:
        """(B, T - prompt_len + 1, V) float logits of the decode loop fed idx's own tokens after
        prefilling its first prompt_len: compares decode paths step by step, which greedy text
        cannot (one flipped near-tie changes every later input)."""
        out = [self.step(idx[:, :prompt_len], 0)]
        for i in range(prompt_len, idx.shape[1]):
            out.append(self.step(idx[:, i:i + 1], i))
        return torch.stack(out, dim=1).float()


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, batch: int, length: int | None = None, compile: bool = False) -> Engine:
    """The model's engine for `batch` rows and `length` positions, kept between calls (chat turns,
    evaluation prompts): made again only when the batch, the settings, the weights or the autocast
    dtype change. A compiled engine is made for exactly `batch` rows over the whole context (one
    compile serves every length); an eager one grows as needed."""
    device = model.norm.weight.device
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None) \
        or model.norm.weight.dtype
    eng = _ENGINES.get(model)
    length = min(length or model.config.max_seq_len, model.config.max_seq_len)
    fits = eng is not None and eng.key == _weights_key(model) and eng.dtype == dtype and \
        (eng.compiled is not None) == bool(compile) and eng.length >= length and \
        (eng.batch == batch if compile else eng.batch >= batch)
    if not fits:
        eng = _ENGINES[model] = Engine(model, batch, None if compile else length, compile=compile)
    return eng


def release(model) -> None:
    """Drop the model's engine and its KV cache: a model that trains between samples needs the memory."""
    _ENGINES.pop(model, None)


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                    generator=None, compile: bool = False) -> Iterator[torch.Tensor]:
    """The (B,) next tokens of a (B, T) prompt, one step at a time (Engine.stream)."""
    B, T = idx.shape
    yield from engine_for(model, B, T + max(0, max_new_tokens), compile).stream(
        idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator)


@torch.inference_mode()
def generate(model, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             generator=None, compile: bool = False) -> torch.Tensor:
    """(B, T) prompt -> (B, T + n) tokens; temperature 0 = greedy."""
    new = [t[:, None] for t in generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                               generator, compile)]
    return torch.cat([idx] + new, dim=1)


# -----------------------------------------------------------------------------------------------
# text generation: the one prompt -> tokens path of generate.py, scoring.LM and train.py's samples

# A token stream maps a (B, T) prompt to an iterator of (B,) new-token tensors, one per step.
# generate_stream is the default; tests inject fake streams to check the stop logic.
TokenStream = Callable[[torch.Tensor], Iterator[torch.Tensor]]


def model_token_stream(model, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None,
                       compile: bool = False) -> TokenStream:
    """The default token stream: generate_stream on the model's engine (compile: its static compiled
    step, kept across calls so that a CUDA graph's buffers stay put)."""
    def stream(idx):
        # eos_id=None: stopping is decided in stream_generate, which knows every stop id
        # (<|endoftext|> and <|im_end|> in chat), not just one.
        return generate_stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_id=None, generator=generator, compile=compile)
    return stream


def stream_generate(model, prompt_ids: list[int], max_new_tokens: int = 200, *,
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
    stops = _stop_set(model, stop_ids)
    device = next(model.parameters()).device
    idx = torch.tensor([list(prompt_ids)] * num_samples, dtype=torch.long, device=device)
    if token_stream is None:
        token_stream = model_token_stream(model, max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k, top_p=top_p, generator=generator, compile=compile)
    done = [False] * num_samples
    steps = 0
    stream = token_stream(idx)
    try:
        for new in stream:
            out: list[int | None] = []
            for i, t in enumerate(new.view(-1).tolist()[:num_samples]):
                out.append(None if done[i] else int(t))
                done[i] = done[i] or int(t) in stops
            yield out
            steps += 1
            if all(done) or steps >= max_new_tokens:
                break
    finally:
        close = getattr(stream, "close", None)  # a closed generator ends its decode loop promptly
        if close is not None:
            close()


def _stop_set(model, stop_ids) -> set[int]:
    if stop_ids is None:
        eos = getattr(getattr(model, "tokenizer", None), "eos_id", None)
        stop_ids = [] if eos is None else [eos]
    return {int(s) for s in stop_ids}


def generate_samples(model, prompt_ids: list[int], max_new_tokens: int = 200, *,
                     stop_ids: Iterable[int] | None = None, keep_stop: bool = False,
                     on_step: Callable[[], None] | None = None, **kwargs) -> list[list[int]]:
    """Non-streaming helper: the new token ids of every sample (stop tokens dropped unless
    keep_stop). on_step() is called after each decoding step (a progress bar). Takes the same
    keyword arguments as stream_generate."""
    stops = _stop_set(model, stop_ids)
    rows: list[list[int]] = [[] for _ in range(kwargs.get("num_samples", 1))]
    for step in stream_generate(model, prompt_ids, max_new_tokens, stop_ids=stops, **kwargs):
        for i, t in enumerate(step):
            if t is not None and (keep_stop or t not in stops):
                rows[i].append(t)
        if on_step is not None:
            on_step()
    return rows
