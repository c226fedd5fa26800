"""quantize.py: bit-exact packing, the .bin format (round trips, corruption), strategies and the
report, GPTQ, HF logits parity and GGUF read-back. Runs in well under 90 s on a 2-core CPU."""
import json
import struct
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import cpu_kernels
import quantize as Q
from model import CheckpointError, load_model, model_bytes
from quantized import (FORMAT_VERSION, INT4_KERNEL_GROUPS, HalfEmbedding, Int4Embedding, Int8Embedding, QuantizeError,
                       _kernel_group, decode_parts, encode_parts, int4_linear, int8_linear, pack_int4, quantize_rtn,
                       read_quantized, unpack_int4, write_quantized)
import scoring  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from conftest import in_child_process  # noqa: E402
import engine  # noqa: E402


def _args(**kw):
    base = dict(format="bin", strategy=None, group_size=128, calibration_data=None, calibration_samples=16,
                calibration_seq_len=None, damp=0.01, eval_data=None, limit=None, eval_batch_size=8,
                seed=0, overwrite=False, json=None, quiet=True)
    base.update(kw)
    return Namespace(**base)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_ckpt):
    """One .bin per strategy of the random tiny model (each export takes ~0.1 s)."""
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for s in Q.STRATEGIES:
        path = d / f"tiny-{s}.bin"
        out[s] = (path, Q.export(_args(model=str(tiny_ckpt), output=str(path), strategy=s)))
    return out


# ---------------------------------------------------------------------------------------------
# packing

def test_pack_int4_layout_is_low_nibble_first():
    assert pack_int4(np.array([1, 2, 3])).tolist() == [0x21, 0x03]
    assert pack_int4(np.array([15, 0, 0, 15])).tolist() == [0x0F, 0xF0]
    assert unpack_int4(np.array([0x21, 0x03], np.uint8), 3).tolist() == [1, 2, 3]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 12289])
def test_pack_unpack_int4_bit_exact(n):
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 16, size=n, dtype=np.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.size == (n + 1) // 2
    assert np.array_equal(unpack_int4(packed, n), codes)


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(np.array([16]))
    with pytest.raises(ValueError):
        unpack_int4(np.zeros(3, np.uint8), 9)


# ---------------------------------------------------------------------------------------------
# quantizers and the file format

@pytest.mark.parametrize("qtype,shape,group", [("f32", (5, 7), None), ("f16", (33,), None),
                                               ("q8", (48, 64), None), ("q4", (64, 192), 128),
                                               ("q4", (7, 50), 16), ("q4", (3, 5), 128)])
def test_quant_type_file_round_trip_is_exact(tmp_path, qtype, shape, group):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    qt = quantize_rtn(w, qtype, group or 128, "w")
    path = tmp_path / "one.bin"
    size = write_quantized(path, {"w": qt}, {"d_model": 1})
    assert path.stat().st_size == size
    header, tensors = read_quantized(path)
    back = tensors["w"]
    assert back.qtype == qtype and back.shape == tuple(shape)
    assert torch.equal(back.codes, qt.codes)
    for attr in ("scales", "zeros"):
        if getattr(qt, attr) is not None:
            assert torch.equal(getattr(back, attr), getattr(qt, attr))
    assert torch.equal(back.dequantize(), qt.dequantize())
    err = (qt.dequantize() - w).abs()
    if qtype == "f32":
        assert err.max() == 0
    elif qtype == "f16":
        assert torch.equal(qt.dequantize(), w.half().float())
    elif qtype == "q8":
        # symmetric round-to-nearest: error at most half a step of that row
        assert (err <= qt.scales.float()[:, None] / 2 + 1e-7).all()
        assert qt.codes.abs().max() <= 127
    else:
        idx = torch.arange(shape[1]) // group
        assert (err <= qt.scales.float()[:, idx] / 2 + 1e-6).all()
        assert qt.scales.shape == (shape[0], -(-shape[1] // group))     # short last group, no padding
        assert int(qt.codes.min()) >= 0 and int(qt.codes.max()) <= 15


def test_int4_partial_last_group_uses_only_its_own_values():
    # row of 130 with group 128: the 2-element last group gets its own scale from just those values
    w = torch.zeros(1, 130)
    w[0, :128] = torch.linspace(-1, 1, 128)
    w[0, 128:] = torch.tensor([0.001, -0.002])
    qt = quantize_rtn(w, "q4", 128)
    assert qt.scales.shape == (1, 2)
    assert (qt.dequantize()[0, 128:] - w[0, 128:]).abs().max() < 1e-4
    assert float(qt.scales[0, 1]) < 0.001


def test_bin_file_layout(exports):
    path, _ = exports["int4"]
    raw = path.read_bytes()
    magic, version, flags, hlen, plen = struct.unpack_from("<8sIIQQ", raw, 0)
    assert magic == b"FISHAIQ\x00" and version == FORMAT_VERSION and flags == 0
    header = json.loads(raw[32:32 + hlen])
    start = -(-(32 + hlen) // 64) * 64
    assert len(raw) == start + plen + 32
    for e in header["tensors"]:
        for part in e["parts"].values():
            assert part["offset"] % 64 == 0 and part["offset"] + part["length"] <= plen
    import hashlib
    assert hashlib.sha256(raw[:-32]).digest() == raw[-32:]


# ---------------------------------------------------------------------------------------------
# strategies, loading, report

def test_strategy_plans(tiny_model):
    names = dict(tiny_model.state_dict())
    mixed = {n: Q.plan_qtype(n, w.shape, "mixed") for n, w in names.items()}
    assert mixed["tok_emb.weight"] == "f16" and mixed["norm.weight"] == "f16"
    assert mixed["layers.0.attn.wq.weight"] == mixed["layers.1.attn.wk.weight"] == "q8"
    for n in ("attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down"):
        assert mixed[f"layers.1.{n}.weight"] == "q4"
    assert Q.plan_qtype("tok_emb.weight", (512, 64), "int4") == "q4"
    assert Q.plan_qtype("tok_emb.weight", (512, 64), "int8") == "q8"
    assert Q.plan_qtype("layers.0.attn_norm.weight", (64,), "int4") == "f16"


@pytest.mark.parametrize("strategy,tol", [("fp32", 1e-5), ("fp16", 2e-3), ("int8", 0.05), ("mixed", 0.3),
                                          ("int4", 0.3)])
def test_load_model_reads_every_strategy(exports, tiny_ckpt, strategy, tol):
    path, report = exports[strategy]
    ref = load_model(tiny_ckpt)
    m = load_model(path, dequantize=True)  # issue 12: the default runs quantized (tests at the end)
    assert not m.training and m.tokenizer is not None and m.tokenizer.hash == ref.tokenizer.hash
    # the loaded weights are exactly the stored dequantized values
    _, tensors = read_quantized(path)
    for name, w in m.state_dict().items():
        assert torch.equal(w, tensors[name].dequantize()), name
    idx = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ref(idx)
        b, _ = m(idx)
    assert (a - b).abs().max().item() < tol
    if strategy == "fp32":
        assert torch.allclose(a, b, atol=1e-6)
    m16 = load_model(path, dtype="fp16", dequantize=True)
    assert m16.tok_emb.weight.dtype == torch.float16


def test_report_sizes_and_errors(exports):
    sizes = {s: exports[s][1]["summary"] for s in Q.STRATEGIES}
    params = sizes["fp32"]["params"]
    for s, summ in sizes.items():
        assert summ["params"] == params and summ["fp32_bytes"] == 4 * params
        assert summ["compression_vs_fp32"] == pytest.approx(4 * params / summ["file_bytes"])
        assert summ["file_bytes"] == exports[s][0].stat().st_size
    # payload bytes exactly as docs/FORMAT.md: q4 = ceil(n/2) + 4 bytes per group, q8 = n + 2 per row
    rows = {r["name"]: r for r in exports["int4"][1]["tensors"]}
    r = rows["layers.0.mlp.w_down.weight"]          # 64 x 192, groups 128 + 64
    assert r["bytes"] == 64 * 192 // 2 + 64 * 2 * 4
    rows8 = {r["name"]: r for r in exports["int8"][1]["tensors"]}
    assert rows8["tok_emb.weight"]["bytes"] == 512 * 64 + 512 * 2
    assert sizes["fp32"]["file_bytes"] > sizes["fp16"]["file_bytes"] > sizes["int8"]["file_bytes"] \
        > sizes["mixed"]["file_bytes"] > sizes["int4"]["file_bytes"]
    # errors are ordered by precision
    err = {s: max(r["rel_err"] for r in exports[s][1]["tensors"]) for s in Q.STRATEGIES}
    assert err["fp32"] == 0 and err["fp16"] < 1e-3 < err["int8"] < 0.02 < err["int4"] < 0.2


# ---------------------------------------------------------------------------------------------
# bad files

def _rewrite(path, raw):
    path.write_bytes(bytes(raw))
    return path


def test_truncated_corrupted_magic_version_errors(exports, tmp_path):
    src, _ = exports["mixed"]
    raw = bytearray(src.read_bytes())
    cases = {
        "truncated": (raw[:len(raw) - 100], "truncated"),
        "tiny": (raw[:10], "truncated"),
        "trailing": (raw + b"xx", "trailing"),
        "flipped": (raw[:5000] + bytes([raw[5000] ^ 0x40]) + raw[5001:], "checksum"),
    }
    for name, (data, msg) in cases.items():
        p = _rewrite(tmp_path / f"{name}.bin", data)
        with pytest.raises(CheckpointError, match=msg) as e:
            load_model(p)
        assert str(p) in str(e.value)
    # newer version (with a valid checksum, so the version check is what fires)
    newer = bytearray(raw)
    struct.pack_into("<I", newer, 8, FORMAT_VERSION + 1)
    import hashlib
    newer[-32:] = hashlib.sha256(bytes(newer[:-32])).digest()
    p = _rewrite(tmp_path / "newer.bin", newer)
    with pytest.raises(CheckpointError, match="newer"):
        load_model(p)
    # wrong magic: load_model no longer dispatches here, read_quantized refuses it
    bad = _rewrite(tmp_path / "magic.bin", b"NOTFISH\x00" + raw[8:])
    with pytest.raises(CheckpointError, match="magic"):
        read_quantized(bad)
    with pytest.raises(CheckpointError):
        load_model(bad)


def test_cli_errors_and_no_partial_output(tiny_ckpt, tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"user data")
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--model", str(tiny_ckpt), "--output",
                        str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr and out.read_bytes() == b"user data"
    with pytest.raises(ValueError, match="format hf"):
        Q.export(_args(model=str(tiny_ckpt), output=str(tmp_path / "hf"), format="hf", strategy="int4"))
    with pytest.raises(CheckpointError):
        Q.export(_args(model=str(tmp_path / "missing.pt"), output=str(tmp_path / "y.bin")))
    with pytest.raises(ValueError, match="group-size"):
        Q.export(_args(model=str(tiny_ckpt), output=str(tmp_path / "y.bin"), group_size=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]      # no temp or partial files


def test_cli_json_report_with_perplexity(trained_ckpt, tmp_path, training_texts):
    text = tmp_path / "eval.jsonl"  # 6 documents (a plain .txt file is scored as one text, as benchmark.py full does)
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in training_texts[-6:]), encoding="utf-8")
    out, js = tmp_path / "m.bin", tmp_path / "m.json"
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--model", str(trained_ckpt), "--output",
                        str(out), "--strategy", "mixed", "--eval-data", str(text), "--eval-limit", "4",
                        "--json", str(js)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "compression" not in r.stderr and "x smaller" in r.stdout and "perplexity" in r.stdout
    rep = json.loads(js.read_text())
    assert rep["strategy"] == "mixed" and rep["summary"]["file_bytes"] == out.stat().st_size
    assert {t["name"] for t in rep["tensors"]} == set(load_model(trained_ckpt).state_dict())
    p = rep["perplexity"]
    assert p["documents"] == 4
    assert 1 < p["before"]["token_ppl"] < 200 and 1 < p["after"]["token_ppl"] < 200
    assert p["relative_change"]["token_ppl"] == pytest.approx(p["after"]["token_ppl"] / p["before"]["token_ppl"] - 1)
    assert abs(p["relative_change"]["token_ppl"]) < 0.05


# ---------------------------------------------------------------------------------------------
# GPTQ

def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    n, cols, rows = 2048, 96, 48
    mix = torch.randn(cols, cols) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(n, cols) @ mix * torch.linspace(0.2, 3, cols)      # correlated, uneven scales
    W = torch.randn(rows, cols) * 0.05
    H = 2 * X.T.double() @ X.double() / n
    for qtype in ("q4", "q8"):
        rtn = quantize_rtn(W, qtype, 32)
        gptq = Q.gptq_quantize(W, H, qtype, 32)
        assert gptq.method == "gptq" and gptq.scales.shape == rtn.scales.shape
        e_rtn = (X @ (rtn.dequantize() - W).T).pow(2).mean()
        e_gptq = (X @ (gptq.dequantize() - W).T).pow(2).mean()
        assert e_gptq < 0.8 * e_rtn, (qtype, e_gptq, e_rtn)
        # codes stay in range and the stored form round-trips
        back = decode_parts(qtype, list(W.shape), gptq.group_size, encode_parts(gptq))
        assert torch.equal(back.dequantize(), gptq.dequantize())


def test_gptq_export_loads_and_helps(trained_ckpt, tmp_path, training_texts):
    def first_kb(docs, kb):  # by size, so WikiText articles and python-docs paragraphs give alike
        out, n = [], 0
        for d in docs:
            out.append(d)
            n += len(d)
            if n >= kb * 1000:
                break
        return "\n\n".join(out)
    calib = tmp_path / "calib.txt"
    calib.write_text(first_kb(training_texts[0::2], 40), encoding="utf-8")  # same kind of text,
    held = tmp_path / "held.txt"
    held.write_text(first_kb(training_texts[1::2], 30), encoding="utf-8")   # other documents
    rtn = Q.export(_args(model=str(trained_ckpt), output=str(tmp_path / "rtn.bin"), strategy="int4",
                      group_size=32, eval_data=str(held)))
    gptq = Q.export(_args(model=str(trained_ckpt), output=str(tmp_path / "gptq.bin"), strategy="int4",
                       group_size=32, calibration_data=str(calib), calibration_samples=128,
                       calibration_seq_len=64, eval_data=str(held)))
    assert gptq["calibration"]["samples"] == 128
    # GPTQ covers the block linears; the tied embedding keeps round-to-nearest (see gptq_quantize_model)
    assert {r["method"] for r in gptq["tensors"] if r["qtype"] == "q4" and r["name"] != "tok_emb.weight"} == {"gptq"}
    assert next(r["method"] for r in gptq["tensors"] if r["name"] == "tok_emb.weight") == "rtn"
    _, tensors = read_quantized(tmp_path / "gptq.bin")
    assert tensors["layers.0.attn.wq.weight"].method == "gptq"
    loss_rtn = rtn["perplexity"]["relative_change"]["token_ppl"]
    loss_gptq = gptq["perplexity"]["relative_change"]["token_ppl"]
    assert loss_gptq < loss_rtn


# ---------------------------------------------------------------------------------------------
# HF and GGUF

def test_hf_export_logits_parity(tiny_ckpt, tmp_path):
    from transformers import LlamaForCausalLM
    ref = load_model(tiny_ckpt)
    idx = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = ref(idx)
    for strategy, tol in (("fp32", 1e-4), ("fp16", 2e-2)):
        out = tmp_path / f"hf-{strategy}"
        rep = Q.export(_args(model=str(tiny_ckpt), output=str(out), format="hf", strategy=strategy))
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        assert (out / "tokenizer.json").is_file() and "chat_template" in (out / "tokenizer_config.json").read_text()
        hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
        with torch.no_grad():
            theirs = hf(idx).logits
        assert (theirs - ours).abs().max().item() < tol, strategy
        assert rep["summary"]["params"] == ref.num_params()
        # and our loader reads the directory back
        back = load_model(out)
        with torch.no_grad():
            assert (back(idx)[0] - ours).abs().max().item() < tol


def test_gguf_export_read_back(tiny_ckpt, tmp_path):
    import gguf
    ref = load_model(tiny_ckpt)
    c = ref.config
    ours = {k: v.float() for k, v in ref.state_dict().items()}
    for strategy in ("fp16", "int8", "int4", "mixed"):
        out = tmp_path / f"m-{strategy}.gguf"
        rep = Q.export(_args(model=str(tiny_ckpt), output=str(out), format="gguf", strategy=strategy))
        reader = gguf.GGUFReader(str(out))
        f = reader.fields
        assert bytes(f["general.architecture"].parts[-1]).decode() == "llama"
        assert int(f["llama.block_count"].parts[-1][0]) == c.n_layers
        assert int(f["llama.attention.head_count_kv"].parts[-1][0]) == c.n_kv_heads
        assert len(f["tokenizer.ggml.tokens"].data) == c.vocab_size
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        rows = {r["name"]: r for r in rep["tensors"]}
        back = Q.read_gguf_state(out, c)
        for name, w in ours.items():
            gname, t = rows[name]["gguf_name"], rows[name]["qtype"]
            assert types[gname] == t
            if w.dim() == 1:
                assert t == "F32" and torch.equal(back[name], w)
            elif t == "F16":
                assert torch.equal(back[name], w.half().float())
            else:
                # the file holds exactly gguf's reference quantization of our (Q/K-permuted) weights
                block = 32
                step = w.abs().reshape(w.shape[0], -1, block).amax(-1, keepdim=True)
                step = (step / (127 if t == "Q8_0" else 8)).expand(-1, -1, block).reshape(w.shape)
                # half a step (Q8_0) or one step (Q4_0 clips +8 to +7), plus the fp16 rounding of
                # the block scale (up to 127 * 2^-11 steps)
                bound = step * (0.57 if t == "Q8_0" else 1.07) + 1e-6
                assert ((back[name] - w).abs() <= bound).all(), (name, t)
                pw = w
                if name.endswith("attn.wq.weight"):
                    pw = Q.llama_cpp_permute(w, c.n_heads)
                elif name.endswith("attn.wk.weight"):
                    pw = Q.llama_cpp_permute(w, c.n_kv_heads)
                qt = getattr(gguf.GGMLQuantizationType, t)
                want = gguf.quants.dequantize(gguf.quants.quantize(pw.numpy(), qt), qt).reshape(w.shape)
                if name.endswith(("attn.wq.weight", "attn.wk.weight")):
                    n = c.n_heads if name.endswith("wq.weight") else c.n_kv_heads
                    want = Q.llama_cpp_unpermute(torch.from_numpy(np.array(want)), n).numpy()
                assert np.array_equal(back[name].numpy(), np.asarray(want, dtype=np.float32)), name
        if strategy == "mixed":
            assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q8_0"
            assert types["blk.1.ffn_down.weight"] == "Q4_0"
        # the read-back weights give our model's logits (up to quantization)
        m = type(ref)(c)
        m.load_state_dict(back)
        idx = torch.randint(0, c.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (m(idx)[0] - ref(idx)[0]).abs().max().item() < (0.01 if strategy == "fp16" else 0.3)


def test_gguf_fallback_for_odd_rows():
    assert Q.gguf_plan("layers.0.mlp.w_down.weight", (64, 48), "int4") == \
        ("F16", "row length 48 is not a multiple of 32")
    assert Q.gguf_plan("layers.0.mlp.w_down.weight", (64, 64), "int4") == ("Q4_0", None)
    assert Q.gguf_plan("layers.0.attn.wq.weight", (64, 64), "mixed") == ("Q8_0", None)


def test_llama_cpp_permutation_round_trip():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    p = Q.llama_cpp_permute(w, 2)
    # per head of 4 rows [a0 a1 b0 b1] (rotate-halves) -> [a0 b0 a1 b1] (interleaved pairs)
    assert p[:4, 0].tolist() == [0, 6, 3, 9]
    assert torch.equal(Q.llama_cpp_unpermute(p, 2), w)


def test_gguf_tokenizer_metadata(tiny_model, tiny_tokenizer, tmp_path):
    """What llama.cpp reads to tokenize, stop and chat like us (the gguf reader: runs without llama.cpp)."""
    import gguf
    from text_tokenizer import SPECIAL_TOKENS
    out = tmp_path / "m.gguf"
    Q.export_gguf(tiny_model, out, "fp16", progress=False)
    f = gguf.GGUFReader(str(out)).fields
    kv = {k: f[k].contents() for k in f if not k.startswith("GGUF.")}
    tok, c = tiny_tokenizer, tiny_model.config
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (tok.eos_id, tok.eos_id)
    assert kv["tokenizer.ggml.eot_token_id"] == tok.im_end_id
    assert kv["tokenizer.ggml.padding_token_id"] == tok.pad_id
    assert kv["tokenizer.ggml.add_bos_token"] is False and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.ggml.add_space_prefix"] is False
    assert kv["tokenizer.chat_template"] == tok.chat_template
    assert kv["llama.context_length"] == c.max_seq_len and kv["llama.rope.dimension_count"] == c.head_dim
    assert kv["llama.rope.freq_base"] == c.rope_theta and "llama.rope.scaling.type" not in kv
    assert kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    # ids -> pieces exactly as our tokenizer spells them (byte-level), merges in rank order
    backend = tok.backend
    assert kv["tokenizer.ggml.tokens"] == [backend.id_to_token(i) for i in range(c.vocab_size)]
    tj = json.loads(tok.to_dict()["tokenizer_json"])
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) for m in tj["model"]["merges"]]
    types = kv["tokenizer.ggml.token_type"]
    assert types[:len(SPECIAL_TOKENS)] == [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    assert set(types[len(SPECIAL_TOKENS):]) == {gguf.TokenType.NORMAL}
    # the model's vocabulary is the tokenizer's rounded up to 64: the extra ids are unused placeholders
    tokens, types, _ = Q._gguf_vocab(tok, tok.vocab_size + 64)
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 64)]
    assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}


# The same GGUF files in the real llama.cpp (llama-cpp-python): skipped when it is not installed.
# Verified with llama-cpp-python 0.3.36 and gguf 0.19.0.

LLAMA_CPP_MISSING = ("llama-cpp-python is not installed: `pip install llama-cpp-python` (it compiles "
                     "llama.cpp, ~6 minutes on 2 cores) to test the GGUF export in the real llama.cpp")
GGUF_SAMPLES = [
    "In 1892 the town had 12,345 people; by 2024, 3.5 million (+28.6%)!!! Really...?",
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # circle\n\n\tif a != b: print(f'{a!r}')\n",
    "你好，世界！这是一个测试。北京2008年奥运会。",
    "fish 🐟 party 🎉 thumbs 👍🏽 family 👨‍👩‍👧 ½ ² ٣ ３",
    "   leading, inner   runs,\ttabs\t\tand trailing   \n\n\n  \r\n",
    "It's we'll they've I'M DON'T o'clock",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|pad|> plain <|im_end",
    "café naïve µ Ω ℌ𝔢𝔩𝔩𝔬 ﬁ \u00a0nbsp\u3000ideographic\u2028line",
    "", " ", "\n", "0 00 000 0000 123456789",
]
# max |llama.cpp - ours| over the logits (their std is ~3 on the trained fixture). llama.cpp keeps
# its KV cache in F16 (so even ALL_F32 is not exact), and for Q8_0/Q4_0 weights it also rounds the
# activations to Q8_0: measured 0.001 (F32), 0.004 (F16), 0.07 (Q8_0), 0.6 (Q4_0), 0.4 (mixed).
GGUF_LOGIT_TOL = {"fp32": 0.01, "fp16": 0.02, "int8": 0.25, "int4": 1.5, "mixed": 1.5}
GGUF_ACTIVATION_TOL = 0.15       # measured <= 0.06 against our model run on the file's own weights


@pytest.fixture(scope="module")
def llama_ggufs(trained_ckpt, tmp_path_factory):
    """{strategy: llama_cpp.Llama} of the trained tiny model, exported by `quantize.py --format gguf`."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING, exc_type=ImportError)
    d = tmp_path_factory.mktemp("gguf-llama-cpp")
    models = {}
    for strategy in GGUF_LOGIT_TOL:
        path = d / f"tiny-{strategy}.gguf"
        Q.export(_args(model=str(trained_ckpt), output=str(path), format="gguf", strategy=strategy))
        models[strategy] = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                                           verbose=False)
    yield models
    for llm in models.values():
        llm.close()


def test_llama_cpp_token_ids_are_ours(llama_ggufs, tiny_tokenizer, training_texts):
    tok = tiny_tokenizer
    texts = GGUF_SAMPLES + training_texts[:100]
    for strategy, llm in llama_ggufs.items():
        for text in texts:
            raw = text.encode("utf-8")
            # special=False keeps "<|im_end|>" typed in text as text, like our encode; special=True
            # parses it as the control token, like encode(allow_special=True)
            for special in (False, True):
                ids = tok.encode(text, allow_special=special)
                assert llm.tokenize(raw, add_bos=False, special=special) == ids, (strategy, special, text[:60])
            assert llm.tokenize(raw) == tok.encode(text)             # add_bos_token is false: no BOS added
            ids = tok.encode(text, allow_special=True)
            assert llm.detokenize(ids, special=True) == tok.decode(ids).encode("utf-8"), (strategy, text[:60])
    # random strings over the characters where pre-tokenizers disagree: every kind of whitespace,
    # digits and letters of other scripts, marks, emoji with modifiers and joiners, control strings
    pool = (list("aZ09 .,;!?'\"-_()[]{}<>|/\\@#$%^&*+=~`") + list("\t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028"
            "\u2029\u202f\u3000\u200b\u200d\ufeff") + list("٣३３①²½Ⅻ〇éßЖΩשعहि漢字かカ한ไ\u0301\u20e3\ufe0f")
            + ["🐟", "👍🏽", "👨‍👩‍👧", "€", "…", "\U0001d400", "\ue000", "\x00", "\x7f", "'s", "'LL", "<|im_end|>",
               "<|endoftext|>"])
    rng = np.random.default_rng(0)
    llm = llama_ggufs["fp16"]
    for _ in range(300):
        text = "".join(rng.choice(pool, size=rng.integers(1, 40)))
        for special in (False, True):
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=special) == \
                tok.encode(text, allow_special=special), (special, text)


def test_llama_cpp_matches_a_non_special_added_token(tiny_tokenizer, tmp_path):
    """An added token that is not special (USER_DEFINED in the file) is matched in any text, by both."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING, exc_type=ImportError)
    from text_tokenizer import TextTokenizer
    from model import GPT, ModelConfig
    tj = json.loads(tiny_tokenizer.to_dict()["tokenizer_json"])
    new_id = tiny_tokenizer.vocab_size
    tj["added_tokens"].append({"id": new_id, "content": " fish food", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": False})
    tok = TextTokenizer(json.dumps(tj), tiny_tokenizer.config)
    m = GPT(ModelConfig(vocab_size=new_id + 64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=192,
                        max_seq_len=128))
    m.tokenizer = tok
    out = tmp_path / "added.gguf"
    Q.export_gguf(m, out, "fp16", progress=False)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in ("a fish food b", "<|im_end|> fish food", "fish food"):
            for special in (False, True):
                ids = tok.encode(text, allow_special=special)
                assert llm.tokenize(text.encode(), add_bos=False, special=special) == ids, (text, special)
        assert tok.encode("a fish food")[-1] == new_id and llm.detokenize([new_id]) == b" fish food"
    finally:
        llm.close()


def test_llama_cpp_reads_our_special_tokens_context_and_chat_template(llama_ggufs, tiny_tokenizer, tiny_config):
    import ctypes
    import llama_cpp
    from text_tokenizer import render_chatml
    tok = tiny_tokenizer
    for llm in llama_ggufs.values():
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llm.token_bos() == llm.token_eos() == tok.eos_id
        assert llama_cpp.llama_vocab_eot(vocab) == tok.im_end_id and llama_cpp.llama_vocab_pad(vocab) == tok.pad_id
        assert not llama_cpp.llama_vocab_get_add_bos(vocab) and not llama_cpp.llama_vocab_get_add_eos(vocab)
        # generation ends on <|endoftext|> and on <|im_end|> (end of an assistant turn), not on the others
        assert [i for i in range(8) if llama_cpp.llama_vocab_is_eog(vocab, i)] == sorted([tok.eos_id, tok.im_end_id])
        assert llama_cpp.llama_model_n_ctx_train(llm.model) == tiny_config.max_seq_len
        assert llm.n_vocab() == tiny_config.vocab_size
        assert float(llm.metadata["llama.rope.freq_base"]) == tiny_config.rope_theta
    # llama.cpp's built-in template engine (llama-cli, llama-server without --jinja) renders our ChatML
    llm = llama_ggufs["fp16"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}]
    chat = (llama_cpp.llama_chat_message * len(msgs))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in msgs])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(llama_cpp.llama_model_chat_template(llm.model, None), chat, len(msgs),
                                            True, buf, len(buf))
    assert buf.raw[:n].decode("utf-8") == render_chatml(msgs, add_generation_prompt=True)


@in_child_process
def test_llama_cpp_logits_match_ours(llama_ggufs, trained_ckpt, tiny_tokenizer):
    ref = load_model(trained_ckpt)
    ids = tiny_tokenizer.encode(" ".join(GGUF_SAMPLES))[:120]
    with torch.no_grad():
        ours = ref(torch.tensor([ids]))[0][0].numpy()
    for strategy, llm in llama_ggufs.items():
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)])
        err = float(np.abs(theirs - ours).max())
        assert err < GGUF_LOGIT_TOL[strategy], (strategy, err)
        # against our model run on the file's own (dequantized) weights only llama.cpp's F16 KV cache
        # and Q8_0 activations remain: the quantized files are computed right, not just roughly
        m = type(ref)(ref.config).eval()
        m.load_state_dict(Q.read_gguf_state(llm.model_path, ref.config))
        with torch.no_grad():
            same_weights = m(torch.tensor([ids]))[0][0].numpy()
        assert float(np.abs(theirs - same_weights).max()) < GGUF_ACTIVATION_TOL, strategy


def _llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation of ids, up to n tokens, ending at an end-of-generation token."""
    import llama_cpp
    vocab, out = llama_cpp.llama_model_get_vocab(llm.model), []
    for t in llm.generate(ids, temp=0.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, t) or len(out) == n:
            break
        out.append(t)
    return out


@in_child_process
def test_llama_cpp_greedy_text_is_ours(llama_ggufs, trained_ckpt, tiny_tokenizer):
    """F16 greedy decoding in llama.cpp picks our model's greedy tokens. A weak tiny model has
    near-ties: where our own top two logits are closer than twice the proven logit error, either pick is
    right, so every step is checked against that bound and a continuation without such a tie must be
    identical, text included (create_completion, the path a llama-cpp-python user calls)."""
    ref, tok, n = load_model(trained_ckpt), tiny_tokenizer, 24
    prompts = ["The album was released on", "It was the best of times,", "def main():\n    ",
               "In the first season, the team", "The history of the city began in 1892, when"]
    llm, tie, identical = llama_ggufs["fp16"], 2 * GGUF_LOGIT_TOL["fp16"], 0
    for prompt in prompts:
        ids = tok.encode(prompt)
        theirs = _llama_cpp_greedy(llm, ids, n)
        with torch.no_grad():
            logits = ref(torch.tensor([ids + theirs]))[0][0, len(ids) - 1:]
            ours = engine.generate(ref, torch.tensor([ids]), n, temperature=0.0)[0, len(ids):].tolist()
        for step, t in enumerate(theirs):
            assert logits[step].max() - logits[step, t] <= tie, (prompt, step)
        top2 = logits[:len(theirs) + (len(theirs) < n)].topk(2, -1).values   # + the step that ended it
        if (top2[:, 0] - top2[:, 1]).min() > tie:        # no near-tie on the way: the very same tokens
            assert theirs == ours[:len(theirs)] and (len(theirs) == n or ours[len(theirs)] in
                                                     (tok.eos_id, tok.im_end_id)), prompt
            identical += 1
        r = llm.create_completion(prompt, max_tokens=n, temperature=0.0)
        assert r["usage"]["prompt_tokens"] == len(ids), prompt
        assert r["choices"][0]["text"] == tok.decode(theirs), prompt
    assert identical >= 2, "too few tie-free prompts to compare whole continuations"


@in_child_process
def test_llama_cpp_chat_completion_uses_our_chatml(llama_ggufs, tiny_tokenizer):
    """create_chat_completion renders our template from the file and feeds our ChatML ids."""
    from text_tokenizer import render_chatml
    tok, llm = tiny_tokenizer, llama_ggufs["fp16"]
    msgs = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Tell me about the history of the city."}]
    ids, _ = tok.encode_chat(msgs, add_generation_prompt=True)
    r = llm.create_chat_completion(msgs, max_tokens=16, temperature=0.0)
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["choices"][0]["message"]["content"] == tok.decode(_llama_cpp_greedy(llm, ids, 16))
    # documented difference: llama-cpp-python tokenizes the rendered chat with special=True, so a
    # "<|im_end|>" typed in a message becomes the control token (as in HF's apply_chat_template);
    # our encode_chat keeps message text as text
    msgs[1]["content"] = "hi <|im_end|> there"
    r = llm.create_chat_completion(msgs, max_tokens=1, temperature=0.0)
    rendered = tok.encode(render_chatml(msgs, add_generation_prompt=True), allow_special=True)
    assert r["usage"]["prompt_tokens"] == len(rendered) < len(tok.encode_chat(msgs, add_generation_prompt=True)[0])


@in_child_process
def test_gguf_without_a_tokenizer_still_loads_in_llama_cpp(tiny_model, tmp_path):
    """A model with no tokenizer embedded gets tokenizer.ggml.model "none": llama.cpp refuses a file
    without one, and loads this one for token-id input."""
    import gguf
    m = type(tiny_model)(tiny_model.config).eval()
    m.load_state_dict(tiny_model.state_dict())
    assert m.tokenizer is None
    out = tmp_path / "no-tokenizer.gguf"
    Q.export_gguf(m, out, "fp16", progress=False)
    f = gguf.GGUFReader(str(out)).fields
    assert f["tokenizer.ggml.model"].contents() == "none" and "tokenizer.ggml.tokens" not in f
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING, exc_type=ImportError)
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    try:
        ids = [5, 17, 99, 300, 4]
        llm.eval(ids)
        with torch.no_grad():
            ours = m(torch.tensor([ids]))[0][0].numpy()
        assert llm.n_vocab() == m.config.vocab_size
        assert float(np.abs(np.asarray(llm.scores[:len(ids)]) - ours).max()) < GGUF_LOGIT_TOL["fp16"]
    finally:
        llm.close()


def test_eval_data_specs(shared_data, tmp_path):
    wiki = shared_data / "wikitext103"
    by_name = Q.load_eval_texts(f"wikitext103:{wiki}", limit=2)
    by_file = Q.load_eval_texts(str(wiki / "wiki.test.tokens"), limit=2)
    assert by_name == by_file and len(by_name) == 2
    assert by_name[0].lstrip().startswith("= ")          # one text per article
    txt = tmp_path / "t.txt"
    txt.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    # a plain file is one text, as benchmark.py full scores it (the same spec, the same numbers);
    # a jsonl (or directory) gives its documents
    assert Q.load_eval_texts(str(txt)) == ["first doc\n\nsecond doc\n"]
    (tmp_path / "t.jsonl").write_text('{"text": "first doc"}\n{"text": "second doc"}\n', encoding="utf-8")
    assert Q.load_eval_texts(str(tmp_path / "t.jsonl")) == ["first doc", "second doc"]
    with pytest.raises(ValueError, match="eval-data"):
        Q.load_eval_texts(str(tmp_path / "missing.txt"))


def test_seed_command_defaults(tmp_path, tiny_ckpt):
    """`python quantize.py --strategy mixed` as the design card writes it: reads
    checkpoints/fishai-best.pt and writes fishai-mixed.bin in the current directory."""
    import shutil
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny_ckpt, tmp_path / "checkpoints" / "fishai-best.pt")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "quantize.py"), "--strategy", "mixed", "--quiet"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fishai-mixed.bin" in r.stdout
    assert (tmp_path / "fishai-mixed.bin").read_bytes()[:8] == b"FISHAIQ\x00"


# ---------------------------------------------------------------------------------------------
# issue 10 / 14: model card, bits/byte headline, flag vocabulary and exit codes, atomic GGUF

def _quantize_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "quantize.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_hf_export_writes_a_model_card(tiny_model, tmp_path):
    from model import save_checkpoint
    src = tmp_path / "fishai-best.pt"
    train_args = {"data": "corpus.txt", "stage": "pretrain", "lr": 0.002, "batch_size": 4, "max_steps": 8}
    save_checkpoint(src, tiny_model, step=8, best_val_loss=5.4321, train_args=train_args,
                    extra={"stage": "pretrain", "tokens_seen": 2048})
    out = tmp_path / "hf-card"
    rep = Q.export(_args(model=str(src), output=str(out), format="hf", strategy="fp16"))
    card = (out / "README.md").read_text(encoding="utf-8")
    c = tiny_model.config
    assert card.startswith("---\nlibrary_name: transformers\n") and "LLaMA-style decoder" in card
    assert f"| parameters | {tiny_model.num_params():,} " in card and rep["summary"]["params"] == tiny_model.num_params()
    assert f"| layers | {c.n_layers} |" in card and f"| hidden size | {c.d_model} |" in card
    assert f"{c.n_heads} query heads, {c.n_kv_heads} key/value heads" in card and f"intermediate size {c.d_ff}" in card
    assert f"| vocabulary | {c.vocab_size} " in card and f"| context length | {c.max_seq_len} tokens |" in card
    assert "| weights | FP16 |" in card
    assert "after 8 optimizer steps" in card and "training data: `corpus.txt` (pretrain)" in card
    assert "best validation loss: 5.4321" in card and "- tokens_seen: 2048" in card and "| lr | 0.002 |" in card
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in card and "--format gguf" in card
    assert "llama-cli -m hf-card.gguf" in card
    # the fp16 rows measure the real rounding error of the export (it was 0 when measured after the cast)
    errs = [r["rel_err"] for r in rep["tensors"] if len(r["shape"]) == 2]
    assert all(0 < e < 1e-3 for e in errs)
    # an existing directory is swapped only with --overwrite (model.save_hf's atomic_dir)
    with pytest.raises(ValueError, match="--overwrite"):
        Q.export(_args(model=str(src), output=str(out), format="hf", strategy="fp32"))
    Q.export(_args(model=str(src), output=str(out), format="hf", strategy="fp32", overwrite=True))
    assert "| weights | FP32 |" in (out / "README.md").read_text(encoding="utf-8")
    # a file quantize.py did not write is never deleted, not even with --overwrite; the check runs first
    (out / "notes.txt").write_text("mine")
    r = _quantize_cli("--model", src, "--output", out, "--format", "hf", "--overwrite")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --output {out}: holds files that this command did not write (notes.txt); it replaces the folder "
        "as a whole, which would delete them: choose a new or empty folder")
    assert (out / "notes.txt").read_text() == "mine" and "| weights | FP32 |" in (out / "README.md").read_text()
    r = _quantize_cli("--model", src, "--output", tmp_path, "--format", "hf", "--overwrite")
    assert r.returncode == 2 and "contains the input --model" in r.stderr and src.is_file()
    # a quantized .bin keeps no training record: the card says so instead of inventing one
    text = Q.model_card(tiny_model, tmp_path / "x.bin", out, "FP32", Q.training_record(tmp_path / "nope.bin"))
    assert "Not recorded: the source `x.bin`" in text and "optimizer steps" not in text


def test_perplexity_line_leads_with_bits_per_byte():
    def report(spaced, **extra):
        before = {"bits_per_byte": 1.2, "token_ppl": 20.0, "word_ppl": 40.0, "spaced": spaced, **extra}
        after = {"bits_per_byte": 1.26, "token_ppl": 21.0, "word_ppl": 42.0, "spaced": spaced,
                 **{k: v * 1.1 for k, v in extra.items()}}
        return {"data": "eval.txt", "documents": 3, "before": before, "after": after,
                "relative_change": Q.ppl_delta(before, after)}
    en = Q.format_perplexity(report(True))
    assert en == ("perplexity on eval.txt (3 docs): bits/byte 1.2000 -> 1.2600 (+5.00%), "
                  "token ppl 20.000 -> 21.000 (+5.00%), word ppl 40.000 -> 42.000 (+5.00%)")
    zh = Q.format_perplexity(report(False, char_ppl=3.0))
    assert zh.endswith("char ppl 3.000 -> 3.300 (+10.00%)") and "word ppl" not in zh
    assert Q.ppl_delta({"char_ppl": 3.0}, {"char_ppl": 3.3})["char_ppl"] == pytest.approx(0.1)


def test_cli_perplexity_headline_matches_the_json(tiny_ckpt, tmp_path, training_texts, capsys):
    text = tmp_path / "eval.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in training_texts[:3]), encoding="utf-8")
    out, js = tmp_path / "m.bin", tmp_path / "m.json"
    assert Q.main(["--model", str(tiny_ckpt), "--output", str(out), "--strategy", "int8", "--eval-data", str(text),
                   "--eval-limit", "2", "--json", str(js), "--quiet"]) == 0
    p = json.loads(js.read_text())["perplexity"]
    assert p["documents"] == 2                                   # the old --eval-limit spelling still works
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("perplexity on"))
    b, a = p["before"]["bits_per_byte"], p["after"]["bits_per_byte"]
    assert line.startswith(f"perplexity on {text} (2 docs): bits/byte {b:.4f} -> {a:.4f} "
                           f"({p['relative_change']['bits_per_byte']:+.2%})")


def test_cli_flag_vocabulary_and_exit_codes(tiny_ckpt, tmp_path, capsys):
    p = Q.build_parser()
    old = p.parse_args(["--force", "--eval-limit", "3", "--no-progress"])
    assert old.overwrite and old.limit == 3 and old.quiet
    for flag, value in (("--damp", "0"), ("--calibration-samples", "0"), ("--limit", "0"), ("--eval-batch-size", "-1"),
                        ("--calibration-seq-len", "0"), ("--seed", "-1")):
        r = _quantize_cli(flag, value)                           # refused before torch is imported
        assert r.returncode == 2 and r.stderr.startswith(f"error: argument {flag}") and len(r.stderr.splitlines()) == 1

    def error_of(*argv):
        assert Q.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        return err
    assert "missing.pt" in error_of("--model", tmp_path / "missing.pt", "--output", tmp_path / "y.bin")
    # a missing output directory is created when the file is written (at the end, so a failure leaves none)
    new = tmp_path / "new" / "dir"
    assert Q.main(["--model", str(tiny_ckpt), "--output", str(new / "y.bin"), "--quiet"]) == 0
    from common import QUANT_MAGIC
    assert (new / "y.bin").read_bytes()[:8] == QUANT_MAGIC
    capsys.readouterr()
    import shutil
    shutil.rmtree(tmp_path / "new")
    js = tmp_path / "old.json"
    js.write_text("{}", encoding="utf-8")
    err = error_of("--model", tiny_ckpt, "--output", tmp_path / "z.bin", "--json", js, "--quiet")
    assert "--json" in err and "--overwrite" in err
    assert js.read_text() == "{}" and not (tmp_path / "z.bin").exists()
    with pytest.raises(QuantizeError, match="--calibration-seq-len 999 is longer"):
        Q.export(_args(model=str(tiny_ckpt), output=str(tmp_path / "c.bin"), calibration_data=str(js),
                    calibration_seq_len=999))
    # --overwrite (and the old --force) replace an existing export
    out = tmp_path / "x.bin"
    out.write_bytes(b"my notes, not an export")  # --overwrite replaces only this command's kind of file
    err = error_of("--model", tiny_ckpt, "--output", out, "--overwrite", "--quiet")
    assert "is a text file, not a quantized model" in err and out.read_bytes() == b"my notes, not an export"
    for flag in ("--overwrite", "--force"):
        out.write_bytes(QUANT_MAGIC + b"old")
        assert Q.main(["--model", str(tiny_ckpt), "--output", str(out), flag, "--quiet"]) == 0
        assert out.read_bytes()[:8] == b"FISHAIQ\x00"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["old.json", "x.bin"]


def test_gguf_writer_is_atomic_and_follows_the_umask(tiny_model, tmp_path, monkeypatch):
    import os
    out = tmp_path / "m.gguf"
    old = os.umask(0o022)
    try:
        Q.export_gguf(tiny_model, out, "fp16", progress=False)
        assert (out.stat().st_mode & 0o777) == 0o644
        before = out.read_bytes()
        real, calls = Q._gguf_tensor, []

        def failing(*a, **kw):
            calls.append(a[0])
            if len(calls) == 5:
                raise RuntimeError("disk full")
            return real(*a, **kw)
        monkeypatch.setattr(Q, "_gguf_tensor", failing)
        with pytest.raises(RuntimeError, match="disk full"):
            Q.export_gguf(tiny_model, out, "int8", progress=False)
    finally:
        os.umask(old)
    assert out.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["m.gguf"]


# ---------------------------------------------------------------------------------------------
# issue 12: a .bin runs quantized (int8/int4 kernels, memory ~ the file, the fast decode step)

def _bound(x, w):
    """What bf16 activations may cost a matmul: 2^-7 of sum |x| |w| per output (the kernels round
    x to bf16 (2^-9 relative) and their result (2^-9), and the int4 kernel its bf16 scales)."""
    return 2.0 ** -7 * (x.abs() @ w.abs().T) + 1e-6


def test_int8_kernel_signature_is_codes_times_row_scales():
    # torch's kernel, as quantize.Int8Linear calls it: (x bf16 (M, K), codes int8 (N, K), scales (N,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    codes = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(48, generator=g) + 0.5
    y = torch._weight_int8pack_mm(x.bfloat16(), codes, scales.bfloat16()).float()
    w = codes.float() * scales.bfloat16().float()[:, None]
    assert ((y - x.bfloat16().float() @ w.T).abs() <= 2.0 ** -8 * (x.abs() @ w.abs().T)).all()


def test_int4_kernel_dequantizes_q_minus_8_times_scale_plus_zero():
    # the CPU kernel reads qScaleAndZeros (K/group, N, 2) = [scale, zero] and computes
    # w = (q - 8) * scale + zero; the .bin's w = (q - z) * s is then zero = (8 - z) * s
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (32, 128), generator=g, dtype=torch.int32)
    s = torch.rand(32, 2, generator=g) + 0.1
    z = torch.randint(0, 16, (32, 2), generator=g).float()
    w = (q.float() - z.repeat_interleave(64, 1)) * s.repeat_interleave(64, 1)
    sz = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    assert packed.shape == (32, 64) and packed.dtype == torch.uint8
    x = torch.randn(2, 128, generator=g)
    y = torch._weight_int4pack_mm_for_cpu(x, packed, 64, sz)                 # fp32: exact arithmetic
    assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape,group", [((64, 256), 128), ((48, 200), 128), ((96, 192), 128), ((40, 64), 32),
                                         ((64, 100), 50), ((16, 704), 128)])
def test_quantized_linears_match_their_dequantized_weights(shape, group):
    """Per type: the layer's output is x @ W^T of the stored (dequantized) W within bf16 rounding;
    shapes cover padding (K = 200, 100), the .bin's shorter last group (192, 704 = 5.5 groups),
    rows the int4 kernel cannot take (N = 40: dequantized per call) and a non-kernel group (50)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g) * 0.05
    x = torch.randn(2, 3, shape[1], generator=g)
    for qtype in ("q8", "q4"):
        qt = quantize_rtn(w, qtype, group)
        ref = x @ qt.dequantize().T
        layer = int8_linear(qt.codes, qt.scales, "cpu") if qtype == "q8" else int4_linear(qt, "cpu")
        y = layer(x)
        assert y.shape == (2, 3, shape[0]) and y.dtype == torch.float32
        assert ((y - ref).abs() <= _bound(x, qt.dequantize())).all(), (qtype, getattr(layer, "mode", "kernel"))
        if qtype == "q4":
            expect = ("fishai" if cpu_kernels.available() and group % 64 == 0 else
                      "dequant" if shape[0] % 16 or group not in INT4_KERNEL_GROUPS else "cpu")
            assert layer.mode == expect
        else:
            assert layer.kernel == ("fishai" if cpu_kernels.available() else "torch")
    # without a kernel the layer is dequantized for each call: fp32 arithmetic, no bf16
    for qtype in ("q8", "q4"):
        qt = quantize_rtn(w, qtype, group)
        layer = (int8_linear(qt.codes, qt.scales, "cpu", kernel=False) if qtype == "q8"
                 else int4_linear(qt, "cpu", mode="dequant"))
        assert torch.allclose(layer(x), x @ qt.dequantize().T, rtol=1e-5, atol=1e-6)


def test_int4_kernel_group_and_padding():
    assert _kernel_group(704, 128) == 64 and _kernel_group(512, 128) == 128
    assert _kernel_group(200, 128) == 128 and _kernel_group(64, 128) == 64
    qt = quantize_rtn(torch.randn(32, 200), "q4", 128)
    layer = int4_linear(qt, "cpu", mode="cpu")
    assert (layer.kernel_group, layer.pad, layer.scales_and_zeros.shape) == (128, 56, (2, 32, 2))


@pytest.mark.parametrize("mode", ["cpu", pytest.param("fishai", marks=pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"FishAI's CPU kernels do not run here: {cpu_kernels.why()}"))])
@pytest.mark.parametrize("rows", [512, 208, 96, 32])
def test_int4_embedding_reads_rows_from_the_kernel_layout(rows, mode):
    """The tied int4 table is stored once, in the CPU kernel's layout (torch's or FishAI's); lookups
    read it back exactly (torch's: full 64-row blocks, a shorter last block: 208 = 3 x 64 + 16, 96, 32)."""
    qt = quantize_rtn(torch.randn(rows, 192, generator=torch.Generator().manual_seed(3)), "q4", 128)
    head = int4_linear(qt, "cpu", mode=mode)
    emb = Int4Embedding(qt, head, torch.float32)
    assert emb.layout == mode and emb.weight.data_ptr() == head.weight.data_ptr()
    idx = torch.tensor([[0, rows - 1, rows // 2], [1, 17, rows - 16]])
    assert torch.equal(emb(idx), qt.dequantize()[idx])


def test_int8_and_fp16_embeddings_are_exact():
    w = torch.randn(80, 48, generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([3, 79, 0])
    q8 = quantize_rtn(w, "q8")
    emb8 = Int8Embedding(int8_linear(q8.codes, q8.scales, "cpu"), q8.scales, torch.float32)
    assert torch.equal(emb8(idx), q8.dequantize()[idx])
    half = HalfEmbedding(w.half(), torch.float32)
    assert torch.equal(half(idx), w.half().float()[idx])


def test_fused_qkv_and_gate_up_share_the_parts_storage(tmp_path, tiny_model):
    tensors, _ = Q.quantize_model(tiny_model, "int8", progress=False)
    path = tmp_path / "int8.bin"
    write_quantized(path, tensors, tiny_model.config.to_dict())
    m = load_model(path)
    attn, mlp = m.layers[0].attn, m.layers[0].mlp
    assert hasattr(attn, "fused_wq_wk_wv") and hasattr(mlp, "fused_w_gate_w_up")
    fused = attn.fused_wq_wk_wv
    assert attn.wk.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    x = torch.randn(3, tiny_model.config.d_model)
    q, k, v = fused(x).split([attn.wq.out_features, attn.wk.out_features, attn.wv.out_features], -1)
    assert torch.equal(q, attn.wq(x)) and torch.equal(k, attn.wk(x)) and torch.equal(v, attn.wv(x))


@pytest.fixture(scope="module")
def loaded_pairs(exports):
    return {s: (load_model(exports[s][0]), load_model(exports[s][0], dequantize=True)) for s in Q.STRATEGIES}


@pytest.mark.parametrize("strategy", Q.STRATEGIES)
def test_load_model_runs_quantized_by_default(loaded_pairs, strategy):
    qm, dm = loaded_pairs[strategy]
    kinds = {type(mod).__name__ for mod in qm.modules()}
    want = {"fp32": {"Linear", "Embedding"}, "fp16": {"HalfLinear", "HalfEmbedding", "Int8Linear"},
            "int8": {"Int8Linear", "Int8Embedding"}, "int4": {"Int4Linear", "Int4Embedding"},
            "mixed": {"Int8Linear", "Int4Linear", "HalfEmbedding"}}[strategy]
    assert want <= kinds and ("Linear" in kinds) == (strategy == "fp32")
    assert {type(mod).__name__ for mod in dm.modules()} >= {"Linear", "Embedding"}
    assert not qm.training and qm.tokenizer is not None
    idx = torch.randint(0, qm.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = qm(idx)[0], dm(idx)[0]
    assert (a - b).abs().max().item() < (1e-6 if strategy == "fp32" else 0.05 * b.abs().max().item())
    # greedy decoding: the fast decode step gives what the module path (a forward per token) gives
    out = engine.generate(qm, idx[:, :8], 12, temperature=0)
    with torch.no_grad():
        logits = qm(out)[0]
    assert torch.equal(logits[:, 7:-1].argmax(-1), out[:, 8:])


def test_quantized_decode_paths_agree(loaded_pairs, monkeypatch):
    """The engine on a .bin: its direct calls (the fused matmuls), the module calls (a hook on a
    layer) and the static step (compile=True, run eagerly here) give the same tokens."""
    qm, _ = loaded_pairs["mixed"]
    x = torch.randint(0, qm.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(6))
    lean = engine.generate(qm, x, 10, temperature=0)
    seen = []
    h = qm.layers[0].mlp.w_down.register_forward_hook(lambda *a: seen.append(1))
    assert torch.equal(engine.generate(qm, x, 10, temperature=0), lean) and len(seen) == 10
    h.remove()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    assert torch.equal(engine.generate(qm, x, 10, temperature=0, compile=True), lean)
    engine.release(qm)


def test_quantized_memory_is_within_1_5x_the_file(tmp_path):
    """Bytes of parameters + buffers (shared storage once) <= 1.5x the .bin, for a model shaped like
    the presets (vocab >> d_model, d_ff = 704 gives int4 groups of 64)."""
    from model import GPT, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=704, max_seq_len=256)
    gpt = GPT(cfg).eval()
    sizes = {}
    for strategy in Q.STRATEGIES:
        tensors, _ = Q.quantize_model(gpt, strategy, progress=False)
        sizes[strategy] = write_quantized(tmp_path / f"{strategy}.bin", tensors, cfg.to_dict())
        ratio = model_bytes(load_model(tmp_path / f"{strategy}.bin")) / sizes[strategy]
        assert ratio <= 1.5, (strategy, ratio)
        if strategy in ("int8", "int4"):
            assert ratio < 1.15, (strategy, ratio)      # no second copy of the tied table
    # ...while dequantize=True is the float model (7.5x the int4 file)
    assert model_bytes(load_model(tmp_path / "int4.bin", dequantize=True)) > 6 * sizes["int4"]


def test_quantized_perplexity_matches_dequantized_on_wikitext(trained_ckpt, tmp_path, shared_data):
    """Perplexity through the kernels is within 0.1% of the dequantized model (a WikiText-103 test
    slice; the full figure is in docs/RESULTS.md)."""
    texts = Q.load_eval_texts(f"wikitext103:{shared_data / 'wikitext103'}", limit=3)
    texts = [t[:4000] for t in texts]
    for strategy in ("int8", "int4", "mixed"):
        out = tmp_path / f"{strategy}.bin"
        Q.export(_args(model=str(trained_ckpt), output=str(out), strategy=strategy, group_size=64))
        q = scoring.perplexity(scoring.load_lm(out), texts, progress=False)
        d = scoring.perplexity(scoring.load_lm(out, dequantize=True), texts, progress=False)
        assert q["tokens"] == d["tokens"] > 1000
        assert abs(q["token_ppl"] / d["token_ppl"] - 1) < 1e-3, strategy
        assert abs(q["bits_per_byte"] / d["bits_per_byte"] - 1) < 1e-3, strategy


def test_a_bin_source_is_requantized_from_its_float_weights(exports, tmp_path, capsys):
    """A .bin source is exported from its dequantized weights, with a warning that the errors are
    measured against those (not the original floats); a .pt source gets no warning."""
    src, _ = exports["int8"]
    rep = Q.export(_args(model=str(src), output=str(tmp_path / "again.bin"), strategy="int4"))
    assert rep["summary"]["file_bytes"] < src.stat().st_size and rep["source_quantized"] == "int8"
    err = capsys.readouterr().err
    assert f"warning: {src} is already quantized (int8): the export starts from its dequantized weights" in err
    again = load_model(tmp_path / "again.bin", device="cpu", dtype=torch.float32, dequantize=True)
    base = load_model(src, device="cpu", dtype=torch.float32, dequantize=True)
    name = "layers.0.mlp.w_down.weight"
    w, w0 = again.state_dict()[name], base.state_dict()[name]
    # the reported error is the int4 step's alone, against the int8 file's weights
    row = next(r for r in rep["tensors"] if r["name"] == name)
    assert row["max_abs_err"] == pytest.approx((w - w0).abs().max().item(), rel=1e-4)


def cuda(fn):
    """pytest -m cuda selects it; hard-wired to the GPU, so it skips without one (even in the CPU dry run)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


@cuda
def test_cuda_quantized_linears_and_decode(exports, tiny_ckpt):
    """CUDA: int8 (_weight_int8pack_mm) and int4 (tinygemm, _convert_weight_to_int4pack) layers
    match their dequantized weights; generate() and the CUDA-graph decode step run on them."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g) * 0.05
    x = torch.randn(4, 256, generator=g)
    for qtype in ("q8", "q4"):
        qt = quantize_rtn(w, qtype, 128)
        layer = int8_linear(qt.codes, qt.scales, "cuda") if qtype == "q8" else int4_linear(qt, "cuda")
        assert getattr(layer, "mode", "cuda") == "cuda" and getattr(layer, "kernel", True)
        y = layer(x.cuda()).float().cpu()
        assert ((y - x @ qt.dequantize().T).abs() <= _bound(x, qt.dequantize())).all(), qtype
    for strategy in ("int8", "int4", "mixed"):
        m = load_model(exports[strategy][0], device="cuda")
        assert model_bytes(m) <= 1.6 * exports[strategy][0].stat().st_size
        idx = torch.randint(0, m.config.vocab_size, (2, 24), device="cuda", generator=None)
        assert engine.generate(m, idx[:, :8], 16, temperature=0).shape == (2, 24)
        eager = engine.Engine(m, 2).teacher_forced(idx, 8)  # (greedy text on random weights flips at near-ties)
        fast = engine.Engine(m, 2, compile=True)
        assert "CUDA graph" in fast.path, (strategy, fast.path)
        got = fast.teacher_forced(idx, 8)
        assert (got - eager).abs().max() <= 3e-2 * eager.abs().max(), (strategy, fast.path)


def test_generate_cli_runs_a_bin_quantized_or_dequantized(trained_ckpt, tmp_path):
    """generate.py on an int4 .bin: by default the text its int4 kernels give, with --dequantize the
    text its float weights give (each equal to the same model loaded here), and the two runs'
    logits agree within int4's rounding."""
    import generate
    from engine import generate_samples
    assert generate.build_parser().parse_args(["--dequantize"]).dequantize is True
    path = tmp_path / "int4.bin"
    Q.export(_args(model=str(trained_ckpt), output=str(path), strategy="int4", group_size=32))
    outs = {}
    for mode, extra in (("kernels", []), ("float", ["--dequantize"])):
        r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(path), "--prompt", "The",
                            "--temperature", "0", "--max-new-tokens", "12", "--quiet", "--device", "cpu", *extra],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        m = load_model(path, dequantize=bool(extra))
        ids = m.tokenizer.encode("The")
        expected = "The" + m.tokenizer.decode(generate_samples(m, ids, 12, temperature=0.0)[0]) + "\n"
        assert r.stdout == expected, mode
        outs[mode] = (m, r.stdout)
    q, d = outs["kernels"][0], outs["float"][0]
    seq = torch.tensor([q.tokenizer.encode(outs["kernels"][1])[:24]])
    with torch.inference_mode():
        lq, ld = q(seq)[0], d(seq)[0]
    assert (lq - ld).abs().max() <= 0.05 * ld.abs().max()


@pytest.mark.cuda
def test_cuda_quantize_then_generate_every_format(gpu_trained, gpu, tmp_path):
    """quantize.py, then generate.py on the fp32 checkpoint and its int8, int4 and mixed files on the
    GPU (int4 on torch's CUDA int4 kernel layout): each decodes, and each quantized model's logits
    follow its dequantized weights'."""
    from conftest import run_script
    ckpt = gpu_trained / "fishai-best.pt"
    models = [ckpt]
    for strategy in ("int8", "int4", "mixed"):
        out = tmp_path / f"{strategy}.bin"
        r = run_script("quantize.py", "--model", ckpt, "--output", out, "--strategy", strategy, "--group-size", 64,
                       "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
        models.append(out)
    texts = []
    for path in models:
        r = run_script("generate.py", "--model", path, "--prompt", "The", "--temperature", 0, "--max-new-tokens", 24,
                       "--device", gpu, "--quiet")
        assert r.returncode == 0, (path.name, r.stderr[-2000:])
        assert r.stdout.startswith("The") and len(r.stdout) > 10
        texts.append(r.stdout)
    idx = torch.tensor([load_model(ckpt).tokenizer.encode(texts[0])[:32]], device=gpu)
    for path in models[1:]:
        q, d = load_model(path, device=gpu), load_model(path, device=gpu, dequantize=True)
        if gpu == "cuda" and "int4" in path.name:
            assert any(getattr(m, "mode", None) == "cuda" for m in q.modules())  # the CUDA int4 kernel runs
        with torch.inference_mode():
            lq, ld = q(idx)[0].float(), d(idx)[0].float()
        assert (lq - ld).abs().max() <= 0.05 * ld.abs().max(), path.name
        assert (lq.argmax(-1) == ld.argmax(-1)).float().mean() >= 0.9, path.name
