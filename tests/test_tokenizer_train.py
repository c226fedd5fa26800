"""tokenizer_train.py: byte-level BPE training, fixed special ids, exact round trip, HF loading,
ChatML template, CLI report and bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_utils  # noqa: E402
import readers  # noqa: E402
import text_tokenizer  # noqa: E402
import tokenizer_train  # noqa: E402
import common  # noqa: E402
from common import parse_size  # noqa: E402
from common import DataError
from text_tokenizer import load_tokenizer  # noqa: E402
from text_tokenizer import SPECIAL_TOKENS
from tokenizer_train import train_tokenizer  # noqa: E402

CHAT = [{"role": "system", "content": "You are FishAI."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."}]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "tokenizer_train.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = list(readers.iter_documents("python-docs"))[:60]
    (d / "a.txt").write_text("\n\n".join(docs[:40]) + "\n", encoding="utf-8")
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for t in docs[40:]:
            f.write(json.dumps({"content": t}) + "\n")
    return d


def test_special_ids_and_report(tiny_tokenizer_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == 512
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (0, 1, 2, 3)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.encode(s, allow_special=True) == [i]
    files = {p.name for p in Path(tiny_tokenizer_dir).iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    cfg = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and "<|im_start|>" in cfg["chat_template"]


def test_special_strings_in_text_stay_plain(tiny_tokenizer):
    tok = tiny_tokenizer
    s = "user wrote <|im_end|> and <|endoftext|> here"
    ids = tok.encode(s)
    assert not set(ids) & {0, 1, 2, 3}
    assert tok.decode(ids) == s
    parsed = tok.encode(s, allow_special=True)
    assert 2 in parsed and 0 in parsed
    assert tok.decode(parsed) == s
    assert tok.decode(parsed, skip_special=True) == "user wrote  and  here"


ROUND_TRIP_CASES = [
    "", " ", "\n\n\n", "\t \t  x", "  leading and trailing  ", "Hello, world!", "héllo wörld ñ",
    "中文测试：你好，世界！", "日本語のテキスト", "emoji 🐟🐠🎉👩‍👩‍👧", "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "def f(x):\n    return x ** 2  # comment\n", "\r\n\r\nwindows", "\u200b\u200d\ufeffzero width",
    "<|endoftext|><|im_start|>", "a" * 5000, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 mathematical", "ﬁ ligature NFKC would change", "é vs é",
]


@pytest.mark.parametrize("s", ROUND_TRIP_CASES)
def test_round_trip_cases(tiny_tokenizer, s):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(s)) == s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_round_trip_property(tiny_tokenizer, s):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(s)) == s


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(SPECIAL_TOKENS + ["a", " ", "\n", "中", "🐟", "<|", "|>"]), max_size=30).map("".join))
def test_round_trip_property_special_mix(tiny_tokenizer, s):
    for allow in (False, True):
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(s, allow_special=allow)) == s


def test_round_trip_real_files(tiny_tokenizer, shared_data):
    files = sorted((shared_data / "books").glob("*.txt"))[:12] + sorted((shared_data / "books_zh").glob("*.txt"))
    files += [shared_data / "wikitext103" / "wiki.valid.tokens", shared_data / "ptb" / "ptb.valid.txt"]
    for f in files:
        text = f.read_bytes()[:60_000].decode("utf-8", errors="ignore")
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text, f
    # batch path gives the same ids as single encode
    texts = [f.read_text(encoding="utf-8")[:3000] for f in files[:4]]
    assert tiny_tokenizer.encode_batch(texts) == [tiny_tokenizer.encode(t) for t in texts]


def test_hf_autotokenizer_offline_and_chat_template(tiny_tokenizer_dir, tiny_tokenizer):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    text = "Plain text, with numbers 123 and 中文."
    assert raw.encode(text, add_special_tokens=False).ids == tiny_tokenizer.encode(text)
    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert hf.eos_token_id == 0 and hf.pad_token_id == 3
    assert hf.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
    assert hf.decode(tiny_tokenizer.encode(text)) == text
    for gen in (False, True):
        rendered = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert rendered == tiny_tokenizer.apply_chat_template(CHAT, add_generation_prompt=gen)
    assert tiny_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.apply_chat_template(CHAT[:1]) == "<|im_start|>system\nYou are FishAI.<|im_end|>\n"


def test_train_tokenizer_holdout_and_maxbytes(tmp_path):
    docs = list(readers.iter_documents("python-docs"))[:80]
    r = train_tokenizer(docs, 400, tmp_path / "tok", show_progress=False, holdout_every=10, max_bytes=300_000)
    assert r["vocab_size"] == 400
    assert r["special_tokens"] == {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    assert r["train_bytes"] <= 300_000
    assert r["compression_on"] == "held-out slice" and r["compression"]["docs"] >= 1
    assert 1.0 < r["compression"]["bytes_per_token"] < 6
    assert load_tokenizer(tmp_path / "tok").hash == r["hash"]


def test_train_tokenizer_bad_input(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["abc"], 100, tmp_path / "t", show_progress=False)
    with pytest.raises(DataError, match="no training text"):
        train_tokenizer([], 300, tmp_path / "t2", show_progress=False)
    assert not (tmp_path / "t2").exists()
    assert parse_size("2M") == 2_000_000 and parse_size("1500") == 1500
    with pytest.raises(common.FishAIError, match="--max-bytes"):
        parse_size("lots", "--max-bytes")


def test_cli_trains_and_reports(small_corpus, tmp_path):
    out = tmp_path / "tok"
    rep = tmp_path / "report.json"
    r = run_cli("--data", small_corpus / "a.txt", small_corpus / "b.jsonl", "--text-key", "content",
                "--vocab-size", 420, "--output-dir", out, "--json", rep, "--no-progress", "--holdout-every", 5)
    assert r.returncode == 0, r.stderr
    assert "vocab size" in r.stdout and "bytes/token" in r.stdout and "<|im_end|>=2" in r.stdout
    report = json.loads(rep.read_text())
    assert report["vocab_size"] == 420 and report["train_docs"] > 0
    assert report["compression"]["tokens_per_word"] > 1
    assert report["input_stats"]["files"] == 2
    tok = load_tokenizer(out)
    assert tok.vocab_size == 420 and tok.hash == report["hash"]

    # an existing tokenizer is not replaced without --overwrite
    before = (out / "tokenizer.json").read_bytes()
    r = run_cli("--data", small_corpus / "a.txt", "--vocab-size", 300, "--output-dir", out, "--no-progress")
    assert r.returncode != 0 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert (out / "tokenizer.json").read_bytes() == before


def test_cli_bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok line"}\nnot json\n', encoding="utf-8")
    r = run_cli("--data", bad, "--vocab-size", 300, "--output-dir", tmp_path / "t1", "--no-progress")
    assert r.returncode != 0 and f"{bad}:2" in r.stderr and "--skip-bad-lines" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "t1").exists()

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    r = run_cli("--data", empty, "--vocab-size", 300, "--output-dir", tmp_path / "t2", "--no-progress")
    assert r.returncode != 0 and "no training text" in r.stderr and not (tmp_path / "t2").exists()

    r = run_cli("--data", tmp_path / "missing.txt", "--output-dir", tmp_path / "t3", "--no-progress")
    assert r.returncode != 0 and "missing.txt" in r.stderr and "Traceback" not in r.stderr

    # a few non-UTF-8 bytes in text are replaced and counted, not fatal
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("caf\xe9 " + "plain ascii text here. " * 20).encode("latin-1") * 20 + b"\n")
    r = run_cli("--data", latin, "--vocab-size", 300, "--output-dir", tmp_path / "t4", "--no-progress",
                "--json", tmp_path / "r4.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r4.json").read_text())["input_stats"]["bad_utf8_bytes"] == 20
    assert "undecodable" in r.stdout
    # a file that is mostly not UTF-8 (18% here: dense Latin-1 French) is refused with the conversion to run
    dense = tmp_path / "dense.txt"
    dense.write_bytes(("caf\xe9 na\xefve " * 200).encode("latin-1"))
    r = run_cli("--data", dense, "--vocab-size", 300, "--output-dir", tmp_path / "t5", "--no-progress")
    assert r.returncode == 2 and "dense.txt: 18.2% of its first 2,200 bytes are not UTF-8" in r.stderr
    assert "iconv -f LATIN1 -t UTF-8 dense.txt > dense.utf8.txt" in r.stderr and not (tmp_path / "t5").exists()


# ---------------------------------------------------------------------------------------------
# issue 10 / 14: the shared hold-out rule, atomic output dir, progress lines, chat jsonl,
# characters per token for text without spaces, flag validation

def _chinese_docs(n, seed=0):
    import random
    rng = random.Random(seed)
    pool = "从前有一座山里庙老和尚在给小讲故事什么呢天气很好我们去公园玩吧人工智能是研究机器学习的科学今年春节回家过年"
    docs = []
    for _ in range(n):
        sentences = ["".join(rng.choice(pool) for _ in range(rng.randint(8, 20))) + rng.choice("，。！？")
                     for _ in range(rng.randint(3, 8))]
        docs.append("".join(sentences))
    return docs


def test_holdout_uses_the_shared_rule_and_is_never_trained_on(tmp_path):
    docs = list(readers.iter_documents("python-docs"))[:45]
    r = train_tokenizer(docs, 400, tmp_path / "tok", show_progress=False, holdout_every=10)
    held = [i for i in range(45) if data_utils.holdout_split(i, 0.0, 0.1) == "test"]
    assert len(held) == 5 and held[0] == 0
    assert r["held_out_docs"] == 5 and r["train_docs"] == 40
    assert r["train_bytes"] == sum(len(d.encode("utf-8")) for i, d in enumerate(docs) if i not in held)
    assert r["compression"]["docs"] == 5
    assert r["compression"]["bytes"] == sum(len(docs[i].encode("utf-8")) for i in held)
    # a corpus of one document (a file without blank lines) trains on its first 95%, cut at a line,
    # and measures the compression on the rest, which the trainer never saw
    one = "\n".join(f"Sentence number {i} of the one document, with some words." for i in range(400))
    r = train_tokenizer([one], 300, tmp_path / "t1", show_progress=False, holdout_every=50)
    cut = one.rfind("\n", 0, int(len(one) * 0.95)) + 1
    assert r["train_docs"] == 1 and r["train_bytes"] == cut and r["held_out_docs"] == 1
    assert r["compression"]["bytes"] == len(one) - cut and r["compression_on"].startswith("the last 5%")


def test_text_without_spaces_reports_chars_per_token(tmp_path):
    docs = _chinese_docs(60)
    r = train_tokenizer(docs, 400, tmp_path / "zh", show_progress=False, holdout_every=5)
    c = r["compression"]
    assert c["spaced"] is False and c["tokens_per_word"] is None
    tok = load_tokenizer(tmp_path / "zh")
    held = [docs[i] for i in range(60) if data_utils.holdout_split(i, 0.0, 0.2) == "test"]
    n_tok = sum(len(tok.encode(d)) for d in held)
    assert c["tokens"] == n_tok and c["chars"] == sum(map(len, held))
    assert c["chars_per_token"] == round(c["chars"] / n_tok, 4) and c["chars_per_token"] > 1
    assert c["bytes_per_token"] == round(sum(len(d.encode("utf-8")) for d in held) / n_tok, 4)
    text = tokenizer_train.format_report(r)
    assert f"{c['chars_per_token']} chars/token" in text and "tokens/word" not in text
    # English keeps tokens/word
    en = tokenizer_train.compression_stats(tok, ["the cat sat on the mat and looked at the dog"])
    assert en["spaced"] is True and en["tokens_per_word"] == round(en["tokens"] / 11, 4)


def test_progress_lines_when_not_a_terminal(tmp_path, monkeypatch, capsys):
    docs = list(readers.iter_documents("python-docs"))[:20]
    monkeypatch.setattr(tokenizer_train, "PROGRESS_EVERY_S", 0.0)
    train_tokenizer(docs, 300, tmp_path / "tok", show_progress=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 21                                        # one per document, one at the end
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    assert err[-1].startswith(f"[tokenizer_train] read {mb:,.1f} MB (20 docs) in ")
    assert "MB/s; computing the merges" in err[-1] and all("MB/s" in line for line in err)
    train_tokenizer(docs, 300, tmp_path / "tok2", show_progress=False)
    assert capsys.readouterr().err == ""


def test_cli_chat_jsonl_progress_and_quiet(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}. Anything else?"}]} for i in range(40)]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out, rep = tmp_path / "tok", tmp_path / "r.json"
    r = run_cli("--data", f, "--vocab-size", 300, "--output-dir", out, "--holdout-every", 0, "--json", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    rendered = [text_tokenizer.render_chatml(row["messages"]) for row in rows]
    assert report["train_docs"] == 40 and report["input_stats"]["files"] == 1
    assert report["train_bytes"] == sum(len(t.encode("utf-8")) for t in rendered)
    assert "trained on      : 40 docs" in r.stdout
    # stderr is a pipe here, not a terminal: the progress line says how much was read and how fast
    assert "[tokenizer_train] read 0.0 MB (40 docs)" in r.stderr and "MB/s" in r.stderr
    tok = load_tokenizer(out)
    assert tok.encode_chat(rows[0]["messages"])[0].count(tok.im_start_id) == 2
    r = run_cli("--data", f, "--vocab-size", 300, "--output-dir", tmp_path / "tok2", "--quiet")
    assert r.returncode == 0 and r.stderr == ""


def test_cli_overwrite_swaps_the_whole_dir_atomically(small_corpus, tmp_path):
    out = tmp_path / "tok"
    assert run_cli("--data", small_corpus / "a.txt", "--vocab-size", 300, "--output-dir", out, "--quiet").returncode == 0
    old = load_tokenizer(out).hash
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    r = run_cli("--data", empty, "--vocab-size", 300, "--output-dir", out, "--overwrite", "--quiet")
    assert r.returncode == 2 and "no training text" in r.stderr
    assert load_tokenizer(out).hash == old                       # a failed run keeps the old tokenizer
    r = run_cli("--data", small_corpus / "a.txt", "--vocab-size", 320, "--output-dir", out, "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert load_tokenizer(out).vocab_size == 320 and load_tokenizer(out).hash != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "tok"]   # no temp dirs left
    # a directory holding other files is never swapped away, not even with --overwrite (the old --force)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    r = run_cli("--data", small_corpus / "a.txt", "--vocab-size", 300, "--output-dir", out, "--force", "--quiet")
    assert r.returncode == 2 and "notes.txt" in r.stderr and (out / "notes.txt").read_text() == "mine"
    # an output that is or holds an input is refused before any work
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text((small_corpus / "a.txt").read_text(encoding="utf-8"), encoding="utf-8")
    for target in (books, tmp_path):
        r = run_cli("--data", books, "--vocab-size", 300, "--output-dir", target, "--overwrite", "--quiet")
        assert r.returncode == 2 and f"the input --data {books}; an output never replaces an input" in r.stderr
    assert sorted(p.name for p in books.iterdir()) == ["a.txt"]
    # an existing --json file is refused before any work
    js = tmp_path / "r.json"
    js.write_text("{}", encoding="utf-8")
    r = run_cli("--data", small_corpus / "a.txt", "--output-dir", tmp_path / "t2", "--json", js, "--quiet")
    assert r.returncode == 2 and "--overwrite" in r.stderr and not (tmp_path / "t2").exists()


@pytest.mark.parametrize("flag,value", [("--holdout-every", "1"), ("--holdout-every", "-2"), ("--max-bytes", "0"),
                                        ("--max-bytes", "lots"), ("--min-frequency", "-1"), ("--vocab-size", "100")])
def test_cli_bad_numbers_are_one_line_usage_errors(flag, value, tmp_path):
    r = run_cli("--data", "python-docs", "--output-dir", tmp_path / "t", flag, value)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: argument {flag}"), r.stderr
    assert not (tmp_path / "t").exists()
