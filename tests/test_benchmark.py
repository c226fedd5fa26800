"""benchmark.py: the shared scoring core (loglikelihood / perplexity), `full` and `self-test`."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import benchmark as B

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_lm(tiny_ckpt):
    return B.load_lm(tiny_ckpt)


@pytest.fixture(scope="module")
def trained_lm(trained_ckpt):
    return B.load_lm(trained_ckpt)


@pytest.fixture(scope="module")
def wiki2_text(shared_data):
    """The start of the real WikiText-2 test file (a few articles), via the data engineer's reader."""
    docs = B.load_datasets([("wikitext2", str(shared_data / "wikitext2" / "test.txt"))], max_chars=12000)
    return docs["wikitext2"]


def _brute_force_nll(lm, ids, stride):
    """Reference implementation: score every token separately with exactly the context the
    windows give it (begin token + up to max_seq_len tokens), one forward per window."""
    L, n = lm.max_seq_len, len(ids)
    full = [lm.begin_id] + ids
    nll = 0.0
    first = min(L, n)
    logp = F.log_softmax(lm.logits(torch.tensor([full[:first]]))[0], -1)
    nll -= float(logp[torch.arange(first), torch.tensor(ids[:first])].sum())
    p = first
    while p < n:
        k = min(stride, n - p)
        end = p + k
        inp = full[end - L:end]  # the L tokens before each of the k targets' last one
        logp = F.log_softmax(lm.logits(torch.tensor([inp]))[0], -1)
        nll -= float(logp[torch.arange(L - k, L), torch.tensor(ids[end - k:end])].sum())
        p = end
    return nll


# ---------------------------------------------------------------------------------------------
# windows and counts

@pytest.mark.parametrize("n,L,stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 8, 1),
                                        (17, 16, 5)])
def test_rolling_windows_score_every_token_once(n, L, stride):
    tokens = list(range(100, 100 + n))
    windows = list(B.rolling_windows(tokens, 7, L, stride))
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == tokens                       # every token once, in order
    assert windows[0][0] == [7]                      # the document starts after the begin token
    for ctx, cont in windows[1:]:
        assert len(cont) <= stride
        assert len(ctx) + len(cont) == L + 1         # full context: L inputs predict the window
        assert (ctx + cont) == tokens[tokens.index(ctx[0]):tokens.index(cont[-1]) + 1]
    if stride < L and n > L:
        # overlapping windows: each later window has L - stride + 1 tokens of context at least
        assert all(len(ctx) >= L - stride + 1 for ctx, _ in windows[1:])


def test_rolling_windows_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        list(B.rolling_windows([1, 2, 3], 0, 8, 9))
    with pytest.raises(ValueError, match="stride"):
        list(B.rolling_windows([1, 2, 3], 0, 8, 0))


def test_word_and_byte_counts_follow_lm_eval_harness(tiny_lm):
    texts = ["Hello  world\nfoo", "  深度学习 很好 "]
    r = B.perplexity(tiny_lm, texts, progress=False)
    assert r["words"] == sum(len(re.split(r"\s+", t)) for t in texts) == 3 + 4
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts) == 16 + 22
    assert r["tokens"] == sum(len(tiny_lm.encode(t)) for t in texts)
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll"] / r["words"]))
    assert r["token_ppl"] == pytest.approx(math.exp(r["nll"] / r["tokens"]))
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / r["bytes"] / math.log(2))


# ---------------------------------------------------------------------------------------------
# perplexity / loglikelihood against a brute-force reference

@pytest.mark.parametrize("stride", [None, 48, 128])
def test_perplexity_matches_brute_force(trained_lm, wiki2_text, stride):
    text = wiki2_text[0][:3000]
    ids = trained_lm.encode(text)
    assert len(ids) > 2 * trained_lm.max_seq_len  # several windows
    r = B.perplexity(trained_lm, [text], stride=stride, batch_size=3, progress=False)
    ref = _brute_force_nll(trained_lm, ids, stride or trained_lm.max_seq_len)
    assert r["tokens"] == len(ids)
    assert r["nll"] == pytest.approx(ref, rel=1e-5)


def test_smaller_stride_gives_more_context_and_lower_ppl(trained_ckpt, wiki2_text):
    # the fixture model was trained on 64-token windows: score within that length
    lm = B.load_lm(trained_ckpt, max_seq_len=64)
    assert lm.max_seq_len == 64
    disjoint = B.perplexity(lm, wiki2_text, progress=False)
    overlap = B.perplexity(lm, wiki2_text, stride=16, progress=False)
    assert overlap["tokens"] == disjoint["tokens"]
    assert overlap["windows"] > disjoint["windows"]
    assert overlap["token_ppl"] < disjoint["token_ppl"]


def test_batch_size_and_padding_do_not_change_scores(trained_lm, wiki2_text):
    a = B.perplexity(trained_lm, wiki2_text, stride=40, batch_size=1, progress=False)
    b = B.perplexity(trained_lm, wiki2_text, stride=40, batch_size=7, progress=False)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_trained_model_beats_random_on_real_wikitext(trained_lm, tiny_lm, wiki2_text):
    trained = B.perplexity(trained_lm, wiki2_text, progress=False)
    rand = B.perplexity(tiny_lm, wiki2_text, progress=False)
    # a random model is near-uniform (ppl ~ vocab); 300 steps on WikiText must be far better
    assert rand["token_ppl"] > 0.7 * tiny_lm.vocab_size
    assert trained["token_ppl"] < 0.5 * rand["token_ppl"]
    assert trained["bits_per_byte"] < rand["bits_per_byte"]


def test_loglikelihood_order_truncation_and_greedy(trained_lm):
    lm = trained_lm
    ctx = lm.encode("The game was played in the city of")
    greedy = lm.generate_ids(ctx, 5, temperature=0)[0]
    other = [(greedy[0] + 1) % lm.vocab_size] + greedy[1:]
    long_ctx = list(range(4, 4 + 3 * lm.max_seq_len))  # longer than the context: cut from the left
    reqs = [(ctx, greedy), (ctx, other), ([], greedy[:2]), (long_ctx, greedy[:3])]
    out = B.loglikelihood(lm, reqs, batch_size=2, progress=False)
    assert out[0][1] is True and out[1][1] is False
    assert out[0][0] > out[1][0]
    # manual computation for request 0 and for the truncated request 3
    for (c, k), (score, _) in [(reqs[0], out[0]), (reqs[3], out[3])]:
        full = (c + k)[-(lm.max_seq_len + 1):]
        logp = F.log_softmax(lm.logits(torch.tensor([full[:-1]]))[0], -1)
        n = len(k)
        ref = logp[torch.arange(len(full) - 1 - n, len(full) - 1), torch.tensor(k)].sum()
        assert score == pytest.approx(float(ref), rel=1e-5)
    # empty context = the begin token
    logp = F.log_softmax(lm.logits(torch.tensor([[lm.begin_id, greedy[0]]]))[0], -1)
    assert out[2][0] == pytest.approx(float(logp[0, greedy[0]] + logp[1, greedy[1]]), rel=1e-5)
    # results come back in request order regardless of the length sorting
    rev = B.loglikelihood(lm, reqs[::-1], batch_size=3, progress=False)[::-1]
    assert [g for _, g in rev] == [g for _, g in out]
    assert [s for s, _ in rev] == pytest.approx([s for s, _ in out], rel=1e-5)
    with pytest.raises(ValueError, match="empty continuation"):
        B.loglikelihood(lm, [(ctx, [])], progress=False)


def test_fishai_checkpoint_and_hf_export_score_identically(tmp_path, tiny_model, trained_ckpt, wiki2_text):
    from model import load_model, save_hf
    model = load_model(trained_ckpt)
    save_hf(model, tmp_path / "hf")
    a = B.perplexity(B.load_lm(trained_ckpt), wiki2_text, progress=False)
    b = B.perplexity(B.load_lm(tmp_path / "hf", hf=True), wiki2_text, progress=False)  # transformers path
    c = B.perplexity(B.load_lm(tmp_path / "hf"), wiki2_text, progress=False)           # FishAI from_hf path
    assert B.load_lm(tmp_path / "hf", hf=True).kind == "hf"
    for r in (b, c):
        assert r["tokens"] == a["tokens"]
        assert r["token_ppl"] == pytest.approx(a["token_ppl"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# LM interface

def test_lm_generate_greedy_matches_model_and_stops(trained_lm):
    lm = trained_lm
    prompt = lm.encode("The history of")
    ids, _ = lm.generate_ids(prompt, 12, temperature=0)
    ref = lm.model.generate(torch.tensor([prompt]), 12, temperature=0, eos_id=lm.eos_id)[0, len(prompt):].tolist()
    assert ids == [t for t in ref if t != lm.eos_id][:len(ids)]
    text = lm.generate(prompt, 12, temperature=0)
    assert text == lm.decode(ids)
    stop = text[2:5]
    if stop.strip():
        cut = lm.generate(prompt, 12, temperature=0, stop=[stop])
        assert stop not in cut and text.startswith(cut)
    # fixed seed -> identical samples; different seed -> (almost surely) different
    s1 = lm.generate_ids(prompt, 16, temperature=1.0, seed=5)
    assert s1 == lm.generate_ids(prompt, 16, temperature=1.0, seed=5)
    assert s1 != lm.generate_ids(prompt, 16, temperature=1.0, seed=6)


def test_load_lm_errors_are_one_line(tmp_path):
    for spec in [tmp_path / "missing.pt", "./nope/model", tmp_path]:
        with pytest.raises(B.BenchmarkError) as e:
            B.load_lm(spec)
        assert "\n" not in str(e.value) and str(spec) in str(e.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(B.BenchmarkError, match="bad.pt"):
        B.load_lm(bad)
    with pytest.raises(B.BenchmarkError, match="dtype"):
        B.load_lm(bad, dtype="int3")


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
                      repeat=1, progress=False, clock="cpu")
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
