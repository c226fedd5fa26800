"""scoring.py: log-likelihoods and perplexity (against a brute-force scorer and lm-evaluation-harness's
counting rules), the LM interface over FishAI and transformers models, the evaluation texts."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import readers
import scoring
import engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_lm(tiny_ckpt):
    return scoring.load_lm(tiny_ckpt)


@pytest.fixture(scope="module")
def trained_lm(trained_ckpt):
    return scoring.load_lm(trained_ckpt)


@pytest.fixture(scope="module")
def wiki2_text(shared_data):
    """The start of the real WikiText-2 test file (a few articles), via the data engineer's reader."""
    docs = scoring.load_datasets([("wikitext2", str(shared_data / "wikitext2" / "test.txt"))], max_chars=12000)
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


@pytest.mark.parametrize("n,L,stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 8, 1),
                                        (17, 16, 5)])
def test_rolling_windows_score_every_token_once(n, L, stride):
    tokens = list(range(100, 100 + n))
    windows = list(scoring.rolling_windows(tokens, 7, L, stride))
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
        list(scoring.rolling_windows([1, 2, 3], 0, 8, 9))
    with pytest.raises(ValueError, match="stride"):
        list(scoring.rolling_windows([1, 2, 3], 0, 8, 0))


def test_word_and_byte_counts_follow_lm_eval_harness(tiny_lm):
    texts = ["Hello  world\nfoo", "  深度学习 很好 "]
    r = scoring.perplexity(tiny_lm, texts, progress=False)
    assert r["words"] == sum(len(re.split(r"\s+", t)) for t in texts) == 3 + 4
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts) == 16 + 22
    assert r["tokens"] == sum(len(tiny_lm.encode(t)) for t in texts)
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll"] / r["words"]))
    assert r["token_ppl"] == pytest.approx(math.exp(r["nll"] / r["tokens"]))
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / r["bytes"] / math.log(2))


@pytest.mark.parametrize("stride", [None, 48, 128])
def test_perplexity_matches_brute_force(trained_lm, wiki2_text, stride):
    text = wiki2_text[0][:3000]
    ids = trained_lm.encode(text)
    assert len(ids) > 2 * trained_lm.max_seq_len  # several windows
    r = scoring.perplexity(trained_lm, [text], stride=stride, batch_size=3, progress=False)
    ref = _brute_force_nll(trained_lm, ids, stride or trained_lm.max_seq_len)
    assert r["tokens"] == len(ids)
    assert r["nll"] == pytest.approx(ref, rel=1e-5)


def test_smaller_stride_gives_more_context_and_lower_ppl(trained_ckpt, wiki2_text):
    # the fixture model was trained on 64-token windows: score within that length
    lm = scoring.load_lm(trained_ckpt, max_seq_len=64)
    assert lm.max_seq_len == 64
    disjoint = scoring.perplexity(lm, wiki2_text, progress=False)
    overlap = scoring.perplexity(lm, wiki2_text, stride=16, progress=False)
    assert overlap["tokens"] == disjoint["tokens"]
    assert overlap["windows"] > disjoint["windows"]
    assert overlap["token_ppl"] < disjoint["token_ppl"]


def test_batch_size_and_padding_do_not_change_scores(trained_lm, wiki2_text):
    a = scoring.perplexity(trained_lm, wiki2_text, stride=40, batch_size=1, progress=False)
    b = scoring.perplexity(trained_lm, wiki2_text, stride=40, batch_size=7, progress=False)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_trained_model_beats_random_on_real_wikitext(trained_lm, tiny_lm, wiki2_text):
    trained = scoring.perplexity(trained_lm, wiki2_text, progress=False)
    rand = scoring.perplexity(tiny_lm, wiki2_text, progress=False)
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
    out = scoring.loglikelihood(lm, reqs, batch_size=2, progress=False)
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
    rev = scoring.loglikelihood(lm, reqs[::-1], batch_size=3, progress=False)[::-1]
    assert [g for _, g in rev] == [g for _, g in out]
    assert [s for s, _ in rev] == pytest.approx([s for s, _ in out], rel=1e-5)
    with pytest.raises(ValueError, match="empty continuation"):
        scoring.loglikelihood(lm, [(ctx, [])], progress=False)


def test_fishai_checkpoint_and_hf_export_score_identically(tmp_path, tiny_model, trained_ckpt, wiki2_text):
    from model import load_model, save_hf
    model = load_model(trained_ckpt)
    save_hf(model, tmp_path / "hf")
    a = scoring.perplexity(scoring.load_lm(trained_ckpt), wiki2_text, progress=False)
    b = scoring.perplexity(scoring.load_lm(tmp_path / "hf", hf=True), wiki2_text, progress=False)  # transformers path
    c = scoring.perplexity(scoring.load_lm(tmp_path / "hf"), wiki2_text, progress=False)           # FishAI from_hf path
    assert scoring.load_lm(tmp_path / "hf", hf=True).kind == "hf"
    for r in (b, c):
        assert r["tokens"] == a["tokens"]
        assert r["token_ppl"] == pytest.approx(a["token_ppl"], rel=1e-3)


def test_lm_generate_greedy_matches_model_and_stops(trained_lm):
    lm = trained_lm
    prompt = lm.encode("The history of")
    ids, _ = lm.generate_ids(prompt, 12, temperature=0)
    ref = engine.generate(lm.model, torch.tensor([prompt]), 12, temperature=0, eos_id=lm.eos_id)[0, len(prompt):].tolist()
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
        with pytest.raises(scoring.ScoringError) as e:
            scoring.load_lm(spec)
        assert "\n" not in str(e.value) and str(spec) in str(e.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(scoring.ScoringError, match="bad.pt"):
        scoring.load_lm(bad)
    with pytest.raises(scoring.ScoringError, match="dtype"):
        scoring.load_lm(bad, dtype="int3")


from conftest import EN_TEXT, ZH_TEXT  # noqa: E402




def _check_char_figures(r, text):
    assert r["chars"] == len(text) and r["bytes"] == len(text.encode("utf-8"))
    assert r["char_ppl"] == pytest.approx(math.exp(r["nll"] / r["chars"]))
    assert r["chars_per_token"] == pytest.approx(r["chars"] / r["tokens"])
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / r["bytes"] / math.log(2))


def test_unspaced_text_gets_character_level_figures(trained_lm):
    zh = scoring.perplexity(trained_lm, ZH_TEXT, progress=False)
    en = scoring.perplexity(trained_lm, EN_TEXT, progress=False)
    _check_char_figures(zh, ZH_TEXT)
    _check_char_figures(en, EN_TEXT)
    assert zh["spaced"] is False and en["spaced"] is True
    assert zh["words"] * readers.SPACED_CHARS_PER_WORD < zh["chars"] and en["words"] * 7 > en["chars"]
    # per word, a whole line is one "word": its perplexity is astronomically large; per character it is not
    assert zh["word_ppl"] > 1e20 and math.isfinite(zh["char_ppl"]) and zh["char_ppl"] < zh["word_ppl"]
    # tables and console lines: bits/byte first, then char PPL for Chinese and word PPL for English
    table = scoring.format_ppl_table({"analects": zh, "english": en})
    head, zh_row, en_row = table.splitlines()
    assert head.split()[1] == "bits/byte" and zh_row.split()[1] == f"{zh['bits_per_byte']:.4f}"
    assert zh_row.split()[2:4] == [scoring.fmt_ppl(zh["char_ppl"]), "char"] and scoring.fmt_ppl(zh["word_ppl"]) not in zh_row
    assert en_row.split()[2:4] == [scoring.fmt_ppl(en["word_ppl"]), "word"]
    line = scoring.describe_ppl("analects", zh)
    assert line.startswith("analects: bits/byte ") and "char ppl" in line and "word ppl" not in line
    assert scoring.describe_ppl("english", en).split(", ")[1] == f"word ppl {scoring.fmt_ppl(en['word_ppl'])}"


def test_real_chinese_book_is_scored_per_character(trained_lm, shared_data):
    """The first 20 KB of a real Chinese book (the old output printed word ppl 2.02e+117 here)."""
    book = sorted((shared_data / "books_zh").glob("*.txt"))[0]
    text = book.read_bytes()[:20_000].decode("utf-8", "ignore")
    r = scoring.perplexity(trained_lm, text, progress=False)
    _check_char_figures(r, text)
    assert r["spaced"] is False and r["words"] * readers.SPACED_CHARS_PER_WORD < r["chars"]
    assert math.isfinite(r["char_ppl"]) and r["char_ppl"] < r["word_ppl"]
    value, per = scoring.headline_ppl(r)
    assert (value, per) == (r["char_ppl"], "char")


def test_generate_ids_fits_a_long_prompt_to_the_context(trained_lm):
    """engine.fit_prompt: a prompt longer than the context keeps its newest tokens beside the new ones."""
    lm = trained_lm
    prompt = (lm.encode(EN_TEXT) * 4)[: lm.max_seq_len + 20]
    ids, _ = lm.generate_ids(prompt, 6, temperature=0)
    ref, _ = lm.generate_ids(prompt[-(lm.max_seq_len - 6):], 6, temperature=0)
    assert ids == ref and 0 < len(ids) <= 6
    assert lm.generate_ids(prompt, 0) == ([], False)


def test_load_eval_texts_wikitext_real(shared_data):
    f = shared_data / "wikitext103" / "wiki.test.tokens"
    arts = scoring.load_eval_texts("wikitext103", shared_data / "wikitext103", split="test")
    assert len(arts) == 62
    assert "".join(arts) == f.read_text(encoding="utf-8")          # nothing lost, nothing added
    assert arts[0].lstrip().startswith("= Robert Boulter =") and arts[1].startswith(" = Du Fu = ")
    w2 = scoring.load_eval_texts("wikitext2", shared_data / "wikitext2", split="valid")
    assert "".join(w2) == (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    assert len(w2) == 60 and "<unk>" in w2[0]
    det = scoring.load_eval_texts("wikitext103", f, detokenize=True)
    assert len(det) == 62 and " @-@ " not in det[0] and "guest-starring" in det[0]
    assert scoring.wikitext_detokenizer("a @-@ b , c @.@ d ( e ) = = F = =") == "a-b, c.d (e) == F =="


def test_load_eval_texts_ptb_and_text(shared_data, tmp_path):
    ptb = scoring.load_eval_texts("ptb", shared_data / "ptb", split="valid")
    assert len(ptb) == 1 and ptb[0].count("\n") == 3370
    t = tmp_path / "x.txt"
    t.write_text("hello\nworld\n", encoding="utf-8")
    assert scoring.load_eval_texts("text", t) == ["hello\nworld\n"]
    with pytest.raises(scoring.ScoringError, match="^ptb: .*no test file for 'ptb'"):
        scoring.load_eval_texts("ptb", tmp_path)
    with pytest.raises(scoring.ScoringError, match="^lambada: unknown dataset name without a path"):
        scoring.load_eval_texts("lambada")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(scoring.ScoringError, match="empty"):
        scoring.load_eval_texts("text", tmp_path / "e.txt")
    # a directory or jsonl of documents (any data_utils source), limited and cut
    (tmp_path / "d.jsonl").write_text('{"text": "one two"}\n{"text": "three"}\n{"text": "four"}\n')
    assert scoring.load_eval_texts("mine", tmp_path / "d.jsonl", limit=2) == ["one two", "three"]
    assert scoring.parse_eval_spec("wikitext2") == ("wikitext2", None)
    assert scoring.parse_eval_spec(f"ptb:{tmp_path}") == ("ptb", str(tmp_path))
    assert scoring.parse_eval_spec(str(t)) == ("x", str(t))
