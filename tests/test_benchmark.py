"""benchmark.py: the shared scoring core (loglikelihood / perplexity), `full` and `self-test`."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import benchmark as B
import common
import scoring  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from conftest import in_child_process  # noqa: E402
import engine  # noqa: E402


@pytest.fixture(scope="module")
def trained_lm(trained_ckpt):
    return scoring.load_lm(trained_ckpt)


# ---------------------------------------------------------------------------------------------
# windows and counts


# ---------------------------------------------------------------------------------------------
# perplexity / loglikelihood against a brute-force reference


# ---------------------------------------------------------------------------------------------
# LM interface


def test_generation_quality_metrics():
    assert B.distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert B.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert B.repetition_rate([1, 2, 3, 4] * 3, 4) == pytest.approx(1 - 4 / 9)
    assert B.repetition_rate(list(range(10)), 4) == 0.0
    assert B.distinct_n([[]], 1) == 0.0


def test_generation_quality_is_deterministic(trained_lm):
    kw = dict(prompts=["The city", "人工智能是"], samples_per_prompt=2, max_new_tokens=10, progress=False)
    a = B.generation_quality(trained_lm, **kw)
    b = B.generation_quality(trained_lm, **kw)
    assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]
    assert a["n"] == 4 and 0 < a["distinct_1"] <= 1 and 0 <= a["repetition_rate"] <= 1
    assert 0 <= a["eos_rate"] <= 1 and 0 < a["mean_length"] <= 10


# ---------------------------------------------------------------------------------------------
# CLI: full

def _run(args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_full_cli_on_real_shared_data(tmp_path, trained_ckpt, shared_data):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    p = _run(["full", "--model", str(trained_ckpt), "--device", "cpu",
              "--wikitext103", str(shared_data / "wikitext103" / "wiki.test.tokens"),
              "--data", f"ptb={shared_data / 'ptb' / 'ptb.valid.txt'}",
              "--max-chars", "6000", "--samples", "1", "--gen-tokens", "8", "--no-progress",
              "--json", str(out_json), "--report", str(out_md)])
    assert p.returncode == 0, p.stderr
    res = json.loads(out_json.read_text())
    assert set(res["perplexity"]) == {"wikitext103", "ptb"}
    for r in res["perplexity"].values():
        assert {"token_ppl", "word_ppl", "bits_per_byte", "tokens", "words", "bytes"} <= set(r)
        assert 1 < r["token_ppl"] < 512 and r["word_ppl"] > r["token_ppl"]  # words are longer than tokens
        assert r["bytes"] <= 6000
    assert res["generation"]["n"] == len(B.GEN_PROMPTS)
    md = out_md.read_text()
    assert "| WikiText-103 |" in md and "distinct-1" in md
    assert "WikiText-103" in p.stdout and "word ppl" in p.stdout
    # the JSON file is never overwritten without --overwrite
    p2 = _run(["full", "--model", str(trained_ckpt), "--data", f"x={shared_data / 'ptb' / 'ptb.valid.txt'}",
               "--json", str(out_json)])
    assert p2.returncode != 0 and "--overwrite" in p2.stderr


def test_full_cli_bad_input_is_one_line_error(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "r.json"
    for args, needle in [(["--model", str(tmp_path / "none.pt")], "none.pt"),
                         (["--model", str(tiny_ckpt), "--data", "oops"], "NAME=PATH"),
                         (["--model", str(tiny_ckpt), "--ptb", str(tmp_path / "none.txt")], "none.txt"),
                         (["--model", str(tiny_ckpt), "--data", f"x={tiny_ckpt}", "--stride", "100000"], "--stride")]:
        rc = B.main(["full", *args, "--json", str(out), "--no-generation", "--no-progress"])
        err = capsys.readouterr().err
        assert rc != 0
        assert err.strip().startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# self-test

def test_self_test_checks_pass_and_speed_is_measured(tiny_config):
    res = B.self_test(tiny_config, device="cpu", batch_size=2, seq_len=32, prompt_len=4, decode_tokens=4,
                      repeat=1, progress=False, clock="cpu", quantized=False)  # quantized rows: below
    names = {c["name"]: c for c in res["checks"]}
    assert res["passed"], [c for c in res["checks"] if not c["passed"]]
    assert {"parameter count", "loss at init ~ ln(vocab)", "KV cache (dynamic) = full forward",
            "KV cache (static) = full forward", "same logits as transformers LlamaForCausalLM",
            "greedy decode = LlamaForCausalLM.generate", "training steps lower the loss"} <= set(names)
    assert res["params"] == sum(p.numel() for p in __import__("model").GPT(tiny_config).parameters())
    for key in ["prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "decode_b1_nocache_tok_s",
                "decode_b8_nocache_tok_s", "train_tok_s"]:
        row = res["speed"][key]
        assert row["ours"] > 0 and row["hf"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["hf"])
    assert "train_mfu" not in res["speed"]  # no known peak FLOP/s on a CPU
    table = B.format_speed_table(res["speed"])
    assert "decode tokens/s (batch 1, KV cache" in table and "x" in table
    md = B.self_test_markdown(res)
    assert res["settings"]["clock"] == "process CPU time"
    # every table row keeps its 3 cells: the "|" in "max |logit diff|" is escaped
    rows = [line for line in md.splitlines() if line.startswith("| KV cache")]
    assert len(rows) == 2 and all(line.replace("\\|", "").count("|") == 4 for line in rows)


def ticking_clock(step: float = 1.0):
    """A clock that advances `step` seconds a reading: every timed run then takes exactly `step`, so
    a speed row must be exactly its token count (the arithmetic, not this machine, is checked)."""
    now = [0.0]

    def clock():
        now[0] += step
        return now[0]
    return clock


def test_speed_rows_count_the_tokens_they_time(tiny_config):
    t = B._build_self_test(tiny_config, "cpu", None, False, 2, 32, 4, 4, 1, True, 0, "cpu")
    t.clock = ticking_clock(0.5)
    for fn in B.SPEED_BY_GROUP["prefill"] + B.SPEED_BY_GROUP["decode"]:
        fn(t)
    sp = t.speed
    assert sp["prefill_tok_s"]["ours"] == sp["prefill_tok_s"]["hf"] == 32 / 0.5  # seq_len 32 in 0.5 s
    for batch in (1, 8):
        for cache in ("", "nocache_"):
            row = sp[f"decode_b{batch}_{cache}tok_s"]
            assert row["ours"] == row["hf"] == batch * 4 / 0.5 and row["ratio"] == 1.0  # 4 new tokens a row
    assert "(batch 8, KV cache, 4+4 tokens)" in sp["decode_b8_tok_s"]["label"]


def test_self_test_cli_rejects_bad_flags(tmp_path, capsys):
    for args, needle in [(["--config", "huge"], "tiny"), (["--repeat", "0"], "--repeat")]:
        try:
            rc = B.main(["self-test", *args, "--json", str(tmp_path / "s.json")])
        except SystemExit as e:  # numeric flags are refused while parsing (issue 14), with the same exit code
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err
    assert not (tmp_path / "s.json").exists()


def test_self_test_exit_code_follows_the_checks(tmp_path, tiny_config, monkeypatch, capsys):
    """Exit 0 when every required check passes, 1 when one fails; the JSON says which (issue 14).
    Also the --no-hf path: speed rows without an HF figure."""
    import model
    monkeypatch.setitem(model.CONFIGS, "unit-test", tiny_config)
    args = ["self-test", "--config", "unit-test", "--device", "cpu", "--no-hf", "--batch-size", "2",
            "--seq-len", "32", "--prompt-len", "4", "--max-new-tokens", "4", "--repeat", "1", "--clock", "cpu",
            "--quiet", "--no-quantized"]  # the quantized rows: test_self_test_quantized_rows
    assert B.main([*args, "--json", str(tmp_path / "ok.json")]) == 0
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["passed"] and ok["settings"]["decode_tokens"] == 4
    assert "same logits as transformers LlamaForCausalLM" not in {c["name"] for c in ok["checks"]}
    assert ok["speed"]["decode_b1_tok_s"]["ours"] > 0 and ok["speed"]["decode_b1_tok_s"]["hf"] is None

    def check_always_fails(t):
        t.check("a check that fails", False, "on purpose")

    monkeypatch.setattr(B, "CHECKS", [*B.CHECKS, check_always_fails])
    capsys.readouterr()
    assert B.main([*args, "--json", str(tmp_path / "bad.json")]) == 1
    bad = json.loads((tmp_path / "bad.json").read_text())
    assert not bad["passed"] and bad["checks"][-1] == {"name": "a check that fails", "passed": False,
                                                       "detail": "on purpose", "required": True}
    assert "FAILED: a check that fails" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# issue 14: bits/byte first, character-level figures for text without spaces

from conftest import EN_TEXT, ZH_TEXT  # noqa: E402


def test_full_cli_reports_char_ppl_for_chinese(tmp_path, trained_ckpt, capsys):
    zh, en = tmp_path / "zh.txt", tmp_path / "en.txt"
    zh.write_text(ZH_TEXT * 3, encoding="utf-8")
    en.write_text(EN_TEXT * 3, encoding="utf-8")
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = B.main(["full", "--model", str(trained_ckpt), "--device", "cpu", "--data", f"analects={zh}",
                 "--data", f"english={en}", "--no-generation", "--quiet", "--json", str(out), "--report", str(md)])
    assert rc == 0
    res = json.loads(out.read_text())["perplexity"]
    assert res["analects"]["spaced"] is False and res["english"]["spaced"] is True
    for r in res.values():  # word PPL stays in the JSON for both
        assert {"bits_per_byte", "word_ppl", "char_ppl", "chars", "chars_per_token", "spaced"} <= set(r)
    stdout = capsys.readouterr().out
    assert f"char ppl {scoring.fmt_ppl(res['analects']['char_ppl'])}" in stdout
    assert scoring.fmt_ppl(res["analects"]["word_ppl"]) not in stdout
    report = md.read_text()
    assert "| dataset | bits/byte | PPL | per |" in report
    for name, per in (("analects", "char"), ("english", "word")):
        r = res[name]
        assert f"| {name} | {r['bits_per_byte']:.4f} | {scoring.fmt_ppl(r[per + '_ppl'])} | {per} |" in report


# ---------------------------------------------------------------------------------------------
# issue 14: one flag vocabulary, numbers checked while parsing, exit codes

def test_flag_vocabulary_and_hidden_aliases():
    p = B.build_parser()
    full = p.parse_args(["full"])
    assert (full.dtype, full.max_new_tokens, full.quiet, full.overwrite) == ("auto", 64, False, False)
    old = p.parse_args(["full", "--gen-tokens", "9", "--no-progress", "--force", "--dtype", "bfloat16"])
    assert (old.max_new_tokens, old.quiet, old.overwrite, old.dtype) == (9, True, True, "bf16")
    new = p.parse_args(["full", "--max-new-tokens", "7", "--quiet", "--overwrite", "--limit", "3"])
    assert (new.max_new_tokens, new.quiet, new.overwrite, new.limit) == (7, True, True, 3)
    st = p.parse_args(["self-test", "--decode-tokens", "5"])
    assert st.decode_tokens == 5 and p.parse_args(["self-test", "--max-new-tokens", "6"]).decode_tokens == 6
    assert p.parse_args(["self-test"]).decode_tokens is None and p.parse_args(["self-test"]).dtype == "auto"
    helps = {name: sub.format_help() for name, sub in p._subparsers._group_actions[0].choices.items()}
    assert all("--gen-tokens" not in h and "--no-progress" not in h and "--force" not in h for h in helps.values())
    for bad in (["full", "--limit", "0"], ["full", "--temperature", "-1"], ["full", "--samples", "0"],
                ["full", "--max-chars", "0"], ["full", "--batch-size", "0"], ["self-test", "--threads", "0"],
                ["self-test", "--seq-len", "1"], ["data", "--input", "x", "--tokenizer", "t", "--scale", "0"],
                ["full", "--dtype", "int3"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2, bad


def test_full_exits_1_when_a_dataset_is_not_scored(tmp_path, trained_ckpt, capsys):
    en, empty = tmp_path / "en.txt", tmp_path / "empty.txt"
    en.write_text(EN_TEXT, encoding="utf-8")
    empty.write_text("\n\n", encoding="utf-8")
    out = tmp_path / "r.json"
    rc = B.main(["full", "--model", str(trained_ckpt), "--data", f"english={en}", "--data", f"blank={empty}",
                 "--no-generation", "--quiet", "--json", str(out)])
    assert rc == 1
    res = json.loads(out.read_text())
    assert set(res["perplexity"]) == {"english"} and "blank" in res["errors"]
    assert "error: blank:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# `data`: prepare end to end vs bare encode_batch

def test_data_cli_compares_prepare_with_bare_encode(tmp_path, text_file, tiny_tokenizer_dir, capsys):
    out = tmp_path / "d.json"
    rc = B.main(["data", "--input", str(text_file), "--tokenizer", str(tiny_tokenizer_dir), "--scale", "2",
                 "--repeat", "1", "--filter", "none", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0]) == res
    bare, e2e, x2 = res["bare_encode_batch"], res["end_to_end_x1"], res["end_to_end_x2"]
    assert res["corpus_bytes"] > 100_000 and res["docs"] > 10
    # prepare writes every token bare encode_batch gives, plus one EOS per document
    assert e2e["tokens"] == bare["tokens"] + res["docs"] == res["bare_encode_batch_fast"]["tokens"] + res["docs"]
    assert x2["corpus_bytes"] > 2 * res["corpus_bytes"] and x2["tokens"] > 2 * e2e["tokens"]
    assert res["end_to_end_vs_bare"] == pytest.approx(e2e["MB_per_s"] / bare["MB_per_s"], abs=2e-3)
    assert res["end_to_end_vs_bare_fast"] == pytest.approx(
        e2e["MB_per_s"] / res["bare_encode_batch_fast"]["MB_per_s"], abs=2e-3)
    assert 0.01 < res["end_to_end_vs_bare"] < 10 and 0.01 < res["end_to_end_vs_bare_fast"] < 10
    for r in (bare, e2e):
        assert r["MB_per_s"] == pytest.approx(res["corpus_bytes"] / 1e6 / r.get("seconds", r.get("seconds_pipeline")),
                                              rel=0.01) and len(r["all_seconds"]) == 1
    # the peak memory is prepare's own, not the pages of this (torch-loaded) process it was forked from
    own_rss_mb = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS:")).split()[1]) / 1024
    assert res["peak_rss_MB_x1_vs_xN"] == [e2e["peak_rss_MB"], x2["peak_rss_MB"]]
    assert 5 < e2e["peak_rss_MB"] < own_rss_mb


# ---------------------------------------------------------------------------------------------
# issue 12: self-test rows for the quantized .bin strategies, against HF and llama.cpp

def _has_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def test_self_test_kernel_rows(tiny_config, monkeypatch):
    t = B._build_self_test(tiny_config, "cpu", None, False, 2, 32, 4, 4, 1, True, 0, "cpu")
    t.clock = ticking_clock()
    B.time_kernels(t)
    if not B.cpu_kernels.available():
        assert t.speed == {} and t.checks[-1]["name"] == "FishAI's CPU kernels run here"
        return
    rows = {k: v for k, v in t.speed.items() if k.startswith("kernel_")}
    assert len(rows) == 5 * 2 * 3            # shapes x batch sizes x kinds
    c = tiny_config
    head = rows["kernel_int4_head_b8_calls_s"]
    assert head["peer"] == "torch _weight_int4pack_mm_for_cpu" and head["unit"] == "calls/s"
    assert f"({c.vocab_size}x{c.d_model}), batch 8" in head["label"]
    assert rows["kernel_fp16_qkv_b1_calls_s"]["peer"] == "torch F.linear"
    assert all(r["ours"] == r["hf"] == B.KERNEL_CALLS for r in rows.values())   # one ticking second a run
    # the pairs really are FishAI's and torch's kernels, computing the same matmul
    w = torch.randn(64, 128) * 0.02
    x = torch.randn(3, 128)
    for kind, (ours, theirs, _) in B._kernel_pairs(w).items():
        assert torch.allclose(ours(x), theirs(x), rtol=0.05, atol=0.01), kind
    pairs = B._kernel_pairs(w)
    assert (pairs["int8"][0].kernel, pairs["int8"][1].kernel) == ("fishai", "torch")
    assert (pairs["int4"][0].mode, pairs["int4"][1].mode, pairs["fp16"][1].kernel) == ("fishai", "cpu", "")
    # without the kernels: a warning with the reason, no rows
    monkeypatch.setenv("FISHAI_CPU_KERNELS", "0")
    B.cpu_kernels.reset()
    try:
        t.speed, t.checks = {}, []
        B.time_kernels(t)
        assert t.speed == {} and t.checks[0]["detail"] == "FISHAI_CPU_KERNELS=0" and not t.checks[0]["required"]
    finally:
        monkeypatch.undo()
        B.cpu_kernels.reset()


def test_self_test_quantized_rows(tiny_config):
    t = B._build_self_test(tiny_config, "cpu", None, False, 2, 32, 4, 4, 1, True, 0, "cpu")
    t.clock = ticking_clock()  # each timed run: 1 s, so a row is its token count
    for strategy in B.QUANT_PEERS:
        B.time_quantized(t, strategy)
    sp = t.speed
    for strategy, (_, gguf_name) in B.QUANT_PEERS.items():
        for batch in (1, 8):
            r = sp[f"quant_{strategy}_b{batch}_tok_s"]
            assert r["ours"] == r["hf"] == batch * 4 and r["peer"] == "HF LlamaForCausalLM fp32"
            assert r["ratio"] == 1.0 and f"batch {batch}" in r["label"]
            if _has_llama_cpp():
                lc = sp[f"quant_{strategy}_b{batch}_llama_cpp_tok_s"]
                assert lc["peer"] == f"llama.cpp {gguf_name}" and lc["hf"] > 0 and lc["ours"] == r["ours"]
        mem = sp[f"quant_{strategy}_model_mb"]
        assert mem["peer"] == ".bin file" and mem["ours"] > 0 and mem["hf"] > 0
        rss = sp[f"quant_{strategy}_rss_mb"]                # measured in a fresh process (Linux)
        assert rss["hf"] == mem["hf"] and (rss["ours"] is not None or not Path("/proc/self/statm").exists())
    files = {s: sp[f"quant_{s}_model_mb"]["hf"] for s in B.QUANT_PEERS}
    assert files["int4"] < files["int8"] < files["fp16"] and files["mixed"] < files["fp16"]
    for s in B.QUANT_PEERS:  # the runtime's memory budget: at most 1.5x the file
        assert 0.9 <= sp[f"quant_{s}_model_mb"]["ratio"] <= 1.5, s
    table = B.format_speed_table(sp)
    assert "int4 .bin: decode tokens/s (batch 8" in table and "HF LlamaForCausalLM fp32" in table
    if _has_llama_cpp():
        assert "llama.cpp Q4_0" in table and "llama.cpp Q8_0" in table
    # --no-quantized: no rows
    t.quantized, t.speed = False, {}
    B.time_quantized(t, "int8")
    assert t.speed == {}
    assert B.build_parser().parse_args(["self-test", "--no-quantized"]).quantized is False


@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed")
@in_child_process
def test_llama_cpp_decoder_batches_like_single_rows(trained_ckpt, tmp_path):
    """The llama.cpp peer decodes a batch of rows at once exactly as it decodes each alone, and on
    the F16 export of a trained model it picks the tokens our model picks."""
    import quantize
    from model import load_model
    m = load_model(trained_ckpt)
    path = tmp_path / "m.gguf"
    quantize.export_gguf(m, path, "fp16", progress=False)
    prompts = [m.tokenizer.encode(t)[:6] for t in ("The history of the city", "In the year 1990 the")]
    one = B.LlamaCppDecoder(path, 1, 16, 1, has_vocab=True)
    two = B.LlamaCppDecoder(path, 2, 16, 1, has_vocab=True)
    try:
        alone = [one.generate([p], 8)[0] for p in prompts]
        assert two.generate(prompts, 8) == alone
    finally:
        one.close()
        two.close()
    ours = engine.generate(m, torch.tensor(prompts), 8, temperature=0)[:, 6:].tolist()
    assert [row[:4] for row in ours] == [row[:4] for row in alone]


# a stand-in for LLAMA_WORKER (its protocol, no llama.cpp): WORK is what a run does, ROWS how many
# of the asked rows it returns; it times itself as the real worker does
FAKE_PEER = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
clock = time.process_time if cfg["clock"] == "cpu" else time.perf_counter
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = clock()
    WORK
    rows = [[0] * req["n"] for _ in req["prompts"]]
    print(json.dumps({"tokens": rows[:ROWS], "seconds": clock() - t0}), flush=True)
"""
BUSY = "end = time.process_time() + 0.05\n    while time.process_time() < end: pass"  # 50 ms of CPU work
SLEEP = "time.sleep(0.05)"  # 50 ms of waiting: no CPU time


def _fake_peer(tmp_path, clock: str, work: str, rows: str = "None"):
    return B.LlamaCppPeer(tmp_path / "x.gguf", (1, 8), 8, 1, True, clock=clock,
                          worker=FAKE_PEER.replace("WORK", work).replace("ROWS", rows))


def test_peer_run_refuses_a_run_that_measured_nothing():
    ok = B.peer_run({"tokens": [[1] * 4] * 8, "seconds": 0.02}, 8, 4, "cpu")
    assert ok.seconds == 0.02 and len(ok.tokens) == 8
    for reply, needle in (({"tokens": [[1] * 4] * 8, "seconds": 0.0}, "no time measured"),
                          ({"tokens": [[1] * 4] * 8, "seconds": 1e-9}, "no time measured"),
                          ({"tokens": [[1] * 4] * 8, "seconds": float("nan")}, "no time measured"),
                          ({"tokens": [[1] * 4] * 8}, "no time measured"),
                          ({"tokens": [[1] * 4] * 7, "seconds": 0.02}, "returned 28 tokens for 8 x 4"),
                          ({"tokens": [[1] * 3] * 8, "seconds": 0.02}, "returned 24 tokens for 8 x 4"),
                          ({}, "returned 0 tokens")):
        with pytest.raises(B.PeerMeasuredNothing, match=needle):
            B.peer_run(reply, 8, 4, "cpu")
    assert issubclass(B.PeerMeasuredNothing, B.PeerFailed) and issubclass(B.PeerCrashed, B.PeerFailed)


def test_llama_cpp_rows_are_timed_by_the_childs_own_clock(tiny_config, tmp_path):
    """`self-test --clock cpu` once timed llama.cpp (a child process) with the parent's CPU clock,
    which does not see the child's work: 113,978 tok/s. The child times itself with the same clock;
    a run that measured no work is an error, never a rate."""
    t = B._build_self_test(tiny_config, "cpu", None, False, 2, 32, 4, 4, 1, False, 0, "cpu")
    assert t.clock is time.process_time
    batch, n = 8, t.decode_tokens
    for clock, work in (("cpu", BUSY), ("wall", SLEEP)):  # 50 ms of work by either clock
        t.clock = time.process_time if clock == "cpu" else time.perf_counter
        peer = _fake_peer(tmp_path, clock, work)
        try:
            B._time_quantized_batch(t, t.model, "int4", batch, peer)
        finally:
            peer.close()
        row = t.speed[f"quant_int4_b{batch}_llama_cpp_tok_s"]
        assert batch * n / 0.5 < row["hf"] <= batch * n / 0.05, (clock, row)  # about 50 ms, never ~0
        assert row["ratio"] == row["ours"] / row["hf"]
    t.clock, t.speed = time.process_time, {}
    for clock, work, rows, needle in (("cpu", "pass", "None", "no time measured"),  # a clock that saw no work
                                      ("cpu", BUSY, "-1", "returned 28 tokens for 8 x 4")):
        peer = _fake_peer(tmp_path, clock, work, rows)
        try:
            with pytest.raises(B.PeerMeasuredNothing, match=needle):
                B._time_quantized_batch(t, t.model, "int4", batch, peer)
        finally:
            peer.close()
    assert not any("llama_cpp" in k for k in t.speed)


@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed")
@in_child_process
def test_the_real_llama_cpp_worker_times_its_own_work(trained_ckpt, tmp_path):
    import quantize
    from model import load_model
    m = load_model(trained_ckpt)
    path = tmp_path / "m.gguf"
    quantize.export_gguf(m, path, "fp16", progress=False)
    for clock in ("cpu", "wall"):
        peer = B.LlamaCppPeer(path, (8,), 32, 1, True, clock=clock)
        try:
            t0 = time.perf_counter()
            run = peer.generate([[1, 2, 3, 4]] * 8, 16)
            wall = time.perf_counter() - t0
        finally:
            peer.close()
        assert len(run.tokens) == 8 and all(len(r) == 16 for r in run.tokens)
        assert 8 * 16 * B.MIN_PEER_SECONDS_PER_TOKEN <= run.seconds <= wall


def test_dequantize_flag_reaches_load_model(tmp_path, tiny_ckpt):
    import quantize
    assert B.build_parser().parse_args(["full", "--dequantize"]).dequantize is True
    out = tmp_path / "m.bin"
    quantize.main(["--model", str(tiny_ckpt), "--output", str(out), "--strategy", "int4", "--quiet"])
    kinds = {type(x).__name__ for x in scoring.load_lm(out).model.modules()}
    assert "Int4Linear" in kinds and "Linear" not in kinds
    assert "Linear" in {type(x).__name__ for x in scoring.load_lm(out, dequantize=True).model.modules()}


# ----------------------------------------------------------------------------- recipe

def test_recipe_helpers_split_runs_and_crossing(tmp_path):
    import model as fishai
    for i in range(12):
        (tmp_path / f"book{i:02d}.txt").write_text(f"book {i}\n\nsome text", encoding="utf-8")
    train_books, test_books = B.split_books(str(tmp_path))
    assert [p.name for p in test_books] == ["book00.txt", "book10.txt"]  # whole books, the hold-out rule
    assert len(train_books) == 10 and not set(train_books) & set(test_books)
    runs = B.recipe_runs(fishai.get_config("tiny"), [0.5, 1, 2], [1], [0.02, 0.1], 200)
    assert [r.overrides.get("optimizer") for r in runs] == ["adamw"] * 6 + [None]  # None: the recipe's
    import train
    lr = train.RECIPE_LR["adamw"]
    assert [r.overrides["lr"] for r in runs[:6]] == pytest.approx([lr * m for m in (0.5, 0.5, 1, 1, 2, 2)])
    assert [r.overrides["warmup"] for r in runs[:6]] == [4, 20] * 3 and runs[6].overrides == {}
    # the sweep widens while the best baseline LR sits at an edge, at the best run's warmup
    for r, loss in zip(runs, [3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 2.0]):
        r.result["final_val_loss"] = loss
    extra = B.widen_baseline(runs)
    assert extra.overrides == {"optimizer": "adamw", "schedule": "cosine", "lr": pytest.approx(lr / 4), "warmup": 4}
    extra.result["final_val_loss"] = 3.05
    assert B.widen_baseline(runs + [extra]) is None  # the best (lr/2) is now inside the sweep
    runs[5].result["final_val_loss"] = 1.0  # the highest LR best: twice it is next
    assert B.widen_baseline(runs).overrides["lr"] == pytest.approx(lr * 4)
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert B.crossing_tokens(curve, 3.5) == 250 and B.crossing_tokens(curve, 5.5) == 100
    assert B.crossing_tokens(curve, 2.0) is None
    with pytest.raises(scoring.ScoringError, match="--baseline-lrs"):
        B._multiples("0,x", "--baseline-lrs")
    with pytest.raises(scoring.ScoringError, match="--data"):
        B.split_books(str(tmp_path / "missing"))


def test_recipe_command_trains_both_recipes_and_reports(tmp_path, training_texts):
    books = tmp_path / "books"
    books.mkdir()
    for i in range(10):  # 10 small "books" of real text: 9 train, 1 held out
        (books / f"b{i}.txt").write_text("\n\n".join(training_texts[i * 20:(i + 1) * 20]), encoding="utf-8")
    out = tmp_path / "r.json"
    cmd = ["recipe", "--data", str(books), "--tokens", "8K", "--vocab-size", "300", "--evals", "2",
           "--eval-iters", "1", "--test-chars", "3000", "--baseline-lrs", "1,2", "--baseline-warmups", "0.5",
           "--max-extend", "1"]
    assert B.main(cmd + ["--json", str(out), "--report", str(tmp_path / "r.md"), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["test_docs"] == 1 and res["train_docs"] == 9 and res["steps"] == 2
    names = [r["name"].split()[0] for r in res["runs"]]
    # two LRs: the best is always at an edge, so one run is added (--max-extend 1), after the default
    assert names == ["adamw+cosine", "adamw+cosine", "default", "adamw+cosine"] and res["baseline_runs"] == 3
    assert all(r["warmup"] == 1 for r in res["runs"] if "warmup" in r)
    target = min(r["final_val_loss"] for r in res["runs"] if r["name"].startswith("adamw"))
    assert res["target_val_loss"] == target
    for r in res["runs"]:
        assert len(r["curve"]) == 2 and r["tokens"] == 2 * res["tokens_per_step"]
        assert 0 < r["test"]["bits_per_byte"] < 10 and math.isfinite(r["final_val_loss"])
        if r["final_val_loss"] <= target:
            assert r["tokens_to_target"] <= r["tokens"]
    md = (tmp_path / "r.md").read_text()
    assert "tokens to target" in md and "default (muon+wsd)" in md and "Baseline sweep: 3 AdamW + cosine runs" in md
    assert (tmp_path / "r.png").stat().st_size > 1000
    # outputs are refused before any work without --overwrite
    assert B.main(cmd + ["--json", str(out), "--quiet"]) == common.EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# on a GPU (pytest -m cuda)

@pytest.mark.cuda
def test_cuda_full_and_self_test(gpu_trained, gpu, shared_data, tmp_path):
    """benchmark.py full on the GPU scores what it scores on the CPU; the self-test's checks pass
    there, with the compiled decode step and the quantized rows."""
    from conftest import run_script
    ckpt, res = gpu_trained / "fishai-best.pt", {}
    for i, device in enumerate((gpu, "cpu")):
        out = tmp_path / f"full-{i}.json"
        r = run_script("benchmark.py", "full", "--model", ckpt, "--device", device, "--dtype", "fp32",
                       "--wikitext2", shared_data / "wikitext2" / "test.txt", "--max-chars", 20000,
                       "--samples", 1, "--max-new-tokens", 16, "--quiet", "--json", out)
        assert r.returncode == 0, r.stderr[-2000:]
        res[device] = json.loads(out.read_text())
    g, c = res[gpu]["perplexity"]["wikitext2"], res["cpu"]["perplexity"]["wikitext2"]
    assert g["tokens"] == c["tokens"] > 1000 and abs(g["bits_per_byte"] / c["bits_per_byte"] - 1) < 1e-4
    st = tmp_path / "st.json"
    # (the training and quantized rows have their own tests; `benchmark.py gpu` times them all)
    r = run_script("benchmark.py", "self-test", "--config", "tiny", "--device", gpu, "--compile", "--only",
                   "decode,compiled-decode", "--decode-tokens", 16, "--repeat", 1, "--quiet", "--json", st)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rep = json.loads(st.read_text())
    assert rep["passed"] and "compiled decode step = eager step (teacher-forced logits)" in {
        c["name"] for c in rep["checks"] if c["passed"]}
    assert set(rep["speed"]) == {"decode_b1_tok_s", "decode_b8_tok_s", "decode_b1_nocache_tok_s",
                                 "decode_b8_nocache_tok_s", "decode_b1_compiled_tok_s"}


def test_a_crashing_llama_cpp_fails_its_rows_not_the_self_test(tiny_config, monkeypatch, tmp_path):
    """llama.cpp runs in a child process: one that dies of SIGSEGV (as its AMX kernel does on some
    CPUs) fails a non-required check with the reason, and every other row is still measured."""
    crash = "import os, signal, sys\nprint('ready', flush=True)\nsys.stdin.readline()\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    peer = B.LlamaCppPeer(tmp_path / "x.gguf", (1,), 8, 1, True, worker=crash)
    with pytest.raises(B.PeerCrashed, match=r"^llama.cpp crashed \(SIGSEGV\) before decoding 1 x 4 tokens.*without AMX"):
        peer.generate([[1, 2]], 4)
    peer.close()
    at_start = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    with pytest.raises(B.PeerCrashed, match=r"crashed \(SIGSEGV\) before ready"):
        B.LlamaCppPeer(tmp_path / "x.gguf", (1,), 8, 1, True, worker=at_start)
    peers = iter([crash, at_start, crash, crash])
    monkeypatch.setattr(B, "_llama_cpp_peer", lambda t, ckpt, strategy: B.LlamaCppPeer(
        ckpt, (1, 8), 8, 1, True, worker=next(peers)))
    res = B.self_test(tiny_config, device="cpu", batch_size=2, seq_len=32, prompt_len=4, decode_tokens=4, repeat=1,
                      progress=False, clock="cpu", only=["quantized"])
    failed = [c for c in res["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == [f"llama.cpp runs the {s} GGUF" for s in B.QUANT_PEERS]
    assert all("SIGSEGV" in c["detail"] and not c["required"] for c in failed) and res["passed"]
    assert {f"quant_{s}_b{b}_tok_s" for s in B.QUANT_PEERS for b in (1, 8)} <= set(res["speed"])
    assert not any("llama_cpp" in k for k in res["speed"])


def test_a_test_run_in_a_child_reports_a_native_crash():
    """conftest.in_child_process (the llama.cpp tests' wrapper): a SIGSEGV fails that test, with the
    reason; a failed assertion comes back as the failure; a passing body passes."""
    import signal

    @in_child_process
    def crashes():
        import faulthandler
        faulthandler.disable()  # pytest's stack dump of this intended crash would only be noise
        os.kill(os.getpid(), signal.SIGSEGV)

    @in_child_process
    def skips():
        pytest.skip("peer missing: install it")

    @in_child_process
    def fails():
        assert 1 == 2, "wrong"

    with pytest.raises(pytest.fail.Exception, match=r"the native peer crashed \(SIGSEGV\).*without AMX"):
        crashes()
    with pytest.raises(pytest.fail.Exception, match="AssertionError: wrong"):
        fails()
    with pytest.raises(pytest.skip.Exception, match="peer missing: install it"):
        skips()
    in_child_process(lambda: None)()


# ---------------------------------------------------------------------------------------------
# `gpu`: the one GPU check, dry-run on the CPU (--allow-cpu)

def _gpu_args(tmp_path, *extra):
    books = tmp_path / "books"
    books.mkdir(exist_ok=True)
    (books / "a.txt").write_text("Once upon a time. " * 50)
    return ["gpu", "--allow-cpu", "--data", str(books), "--workdir", str(tmp_path / "work"),
            "--json", str(tmp_path / "gpu.json"), *extra]


def test_gpu_check_budget_is_five_minutes_shared_by_its_steps():
    args = B.build_parser().parse_args(["gpu"])
    assert args.budget == B.GPU_BUDGET == sum(B.GPU_STEP_SECONDS.values()) == 300
    assert list(B.GPU_STEP_SECONDS) == list(B.GPU_STEPS) == list(B.GPU_STEP_FNS)
    # the slowest, most optional steps come last: a spent budget costs only their figures
    assert B.GPU_STEPS[-2:] == ("pytest", "recipe")
    assert B.GPU_STEP_SECONDS["train"] > B.GPU_TRAIN_STARTUP


def test_gpu_check_dry_run_profiles_a_training_and_a_decode_step(tmp_path):
    skip = ",".join(s for s in B.GPU_STEPS if s != "profile")
    p = _run(_gpu_args(tmp_path, "--config", "tiny", "--skip", skip), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["budget_s"] == 300 and res["limits_s"] == {"profile": B.GPU_STEP_SECONDS["profile"]}
    prof = res["profile"]  # the skipped steps' shares are not handed to it
    assert prof["status"] == "ok" and prof["config"] == "tiny" and prof["limit_s"] <= B.GPU_STEP_SECONDS["profile"]
    for key in ("train_step", "decode_step"):
        step = prof[key]
        top = step["top"]
        assert 0 < len(top) <= B.PROFILE_TOP and all(r["name"] and r["ms"] > 0 and r["calls"] > 0 for r in top)
        assert [r["ms"] for r in top] == sorted((r["ms"] for r in top), reverse=True)
        assert step["top_by"] == "self CPU time" and step["wall_ms"] > 0 and step["cpu_total_ms"] >= top[0]["ms"]
        # no GPU here: no busy time to take from the wall time, and the JSON says why
        assert step["host_idle_ms"] is None and step["device_busy_ms"] is None and step["host_idle_why"]
    assert any(r["name"] == "aten::mm" for r in prof["train_step"]["top"])  # the model's matmuls are there
    ts = prof["train_step"]
    assert (ts["batch_size"], ts["seq_len"], ts["grad_accum"]) == (*B.PROFILE_CPU_BATCH, 1) and not ts["compiled"]
    assert ts["tokens_per_sec"] == pytest.approx(2 * 64 / (ts["wall_ms"] / 1e3), rel=1e-3)
    for b in (1, 8):
        d = prof[f"decode_b{b}"]
        assert d["batch"] == b and d["tokens_per_sec"] > 0 and d["path"] == "eager" and d["build_s"] >= 0
    s = res["summary"]
    assert s["engine_decode_b1_tok_s"] == prof["decode_b1"]["tokens_per_sec"]
    assert s["engine_decode_b8_vs_b1"] == pytest.approx(prof["decode_b8"]["tokens_per_sec"] /
                                                        prof["decode_b1"]["tokens_per_sec"])
    assert s["train_step_top_kernel"] == ts["top"][0]["name"] and s["decode_step_host_idle_share"] is None


class _Ev:  # the fields profile_summary reads of torch.profiler's FunctionEventAvg
    def __init__(self, key, device_type, self_cpu_us, self_device_us, count=1):
        self.key, self.device_type, self.count = key, device_type, count
        self.self_cpu_time_total, self.self_device_time_total = self_cpu_us, self_device_us


def test_profile_summary_on_cuda_counts_kernels_once_and_the_rest_is_host_idle():
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    # the CPU op that launched a kernel carries that kernel's time too: counted, busy would double
    events = [_Ev("aten::mm", cpu, 300, 6000), _Ev("sm90_gemm", cuda, 0, 6000, 3),
              _Ev("triton_red_fused", cuda, 0, 2000, 2), _Ev("Memcpy HtoD", cuda, 0, 1000)]
    s = B.profile_summary(events, wall_ms=12.0, cuda=True, top=2)
    assert [r["name"] for r in s["top"]] == ["sm90_gemm", "triton_red_fused"]
    assert s["top"][0] == {"name": "sm90_gemm", "ms": 6.0, "calls": 3, "share": round(6 / 9, 4)}
    assert s["device_busy_ms"] == 9.0 and s["host_idle_ms"] == 3.0 and s["host_idle_share"] == 0.25
    # no kernel recorded (CUPTI missing): no idle figure rather than "idle the whole step"
    none = B.profile_summary([_Ev("aten::mm", cpu, 300, 0)], wall_ms=5.0, cuda=True)
    assert none["host_idle_ms"] is None and none["device_busy_ms"] is None and "no GPU kernels" in none["host_idle_why"]


def test_gpu_check_step_timing_out_is_killed_with_its_children_and_saved(tmp_path, monkeypatch):
    """A step past its limit: its whole process group is killed (a compile worker or a pytest child
    left running would hold the GPU the next step needs) and the JSON already says so."""
    pid_file = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(120)']); open(sys.argv[1], 'w').write(str(g.pid)); print('started', flush=True); "
             "time.sleep(120)")

    def slow_step(c):
        return c.run("profile", [sys.executable, "-c", child, pid_file])

    monkeypatch.setitem(B.GPU_STEP_FNS, "profile", slow_step)
    skip = ",".join(s for s in B.GPU_STEPS if s != "profile")
    budget = 6 * B.GPU_BUDGET / B.GPU_STEP_SECONDS["profile"]  # 6 s for the profile step
    args = B.build_parser().parse_args(_gpu_args(tmp_path, "--skip", skip, "--budget", str(budget)))
    t0 = time.time()
    assert B.run_gpu(args) == common.EXIT_FAILED
    assert time.time() - t0 < 15
    res = json.loads((tmp_path / "gpu.json").read_text())
    r = res["profile"]
    assert r["status"] == "timed out" and 5 <= r["limit_s"] <= 6 and r["seconds"] >= r["limit_s"] - 0.5
    assert "started" in r["log_tail"]
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed at once; reaping by init may take a moment
        stat = Path(f"/proc/{grandchild}/stat")
        if not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's grandchild {grandchild} outlived its time-out")


def test_gpu_check_step_gets_its_share_plus_what_earlier_steps_left():
    c = B.GpuCheck(args=None, work=Path("."), deadline=time.time() + 100, device="cpu",
                   limits={"data": 10, "train": 30, "recipe": 60})
    c.step = "data"
    assert c.left() == pytest.approx(10, abs=0.5)  # train's and recipe's time is kept for them
    c.step = "train"  # data took no time: its 10 s pass on to train
    assert c.left() == pytest.approx(40, abs=0.5)
    c.step, c.deadline = "recipe", time.time() + 3  # the budget nearly spent: the last step is refused
    assert c.run("recipe", [sys.executable, "-c", "pass"]) == {"status": "skipped", "why": "3 s of the --budget left for it"}


def test_gpu_summary_sets_int8_int4_decode_against_the_engines_bf16_decode():
    res = {"profile": {"decode_b1": {"tokens_per_sec": 200.0}, "decode_b8": {"tokens_per_sec": 1000.0},
                       "train_step": {"wall_ms": 22.6, "host_idle_share": 0.3, "top": [{"name": "gemm"}]}},
           "self-test": {"speed": {"quant_int8_b1_tok_s": {"ours": 50.0}, "quant_int8_b1_compiled_tok_s": {"ours": 300.0},
                                   "quant_int4_b1_tok_s": {"ours": 100.0}, "train_tok_s": {"ours": 7e5, "hf": 7e5}}},
           "train": {"tokens_per_sec": 7.7e5, "mfu": 0.17}}
    s = B.gpu_summary(res)
    assert s["engine_decode_b8_vs_b1"] == 5.0
    assert s["int8_decode_b1_tok_s"] == 300.0 and s["int8_vs_engine_decode_b1"] == 1.5  # the compiled row first
    assert s["int4_decode_b1_tok_s"] == 100.0 and s["int4_vs_engine_decode_b1"] == 0.5
    assert s["loop_vs_isolated_step"] == pytest.approx(1.1) and s["train_step_top_kernel"] == "gemm"
    assert s["decode_step_ms"] is None and B.gpu_summary({})["engine_decode_b1_tok_s"] is None


def test_gpu_check_refuses_an_unknown_config_in_one_line(tmp_path):
    args = B.build_parser().parse_args(_gpu_args(tmp_path, "--config", "huge"))
    with pytest.raises(B.BenchmarkError, match=r"^--config huge: choose from tiny, small"):
        B.run_gpu(args)
    assert not (tmp_path / "gpu.json").exists()
