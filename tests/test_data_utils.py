"""data_utils.py: readers, .bin files, samplers, eval texts, SFT packing, filter, mixer, prepare."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common
import data_utils as du  # noqa: E402
import readers  # noqa: E402
import text_tokenizer  # noqa: E402
import token_data  # noqa: E402
from common import DataError  # noqa: E402


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "data_utils.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    from tokenizer_train import train_tokenizer
    out = tmp_path_factory.mktemp("tok2") / "tok"
    train_tokenizer(["some other corpus text " * 50, "and more words here " * 30], 300, out, show_progress=False)
    return text_tokenizer.load_tokenizer(out)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Three small English text files (blank-line separated paragraphs), distinct paragraphs."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [d_ for d_ in readers.iter_documents("python-docs")][:30]
    for k in range(3):
        paras = [f"Paragraph {k}-{i}. " + re.sub(r"\n\s*\n", "\n", docs[(k * 10 + i) % len(docs)][:400]).strip()
                 for i in range(10)]
        (d / f"part{k}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return d


# ---------------------------------------------------------------------------------------- readers

def test_iter_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first block\nline two\n\n\nsecond block\n  \nthird\n", encoding="utf-8")
    assert list(readers.iter_documents(tmp_path / "a.txt")) == ["first block\nline two", "second block", "third"]
    assert list(readers.iter_documents(tmp_path / "a.txt", txt_mode="line")) == [
        "first block", "line two", "second block", "third"]
    assert list(readers.iter_documents(tmp_path / "a.txt", txt_mode="file")) == [
        "first block\nline two\n\n\nsecond block\n  \nthird\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "j1"}\n\n{"body": "x", "text": "j2"}\n', encoding="utf-8")
    assert list(readers.iter_documents(tmp_path / "b.jsonl")) == ["j1", "j2"]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["p1", "p2", None], "id": [1, 2, 3]}), tmp_path / "c.parquet")
    assert list(readers.iter_documents(tmp_path / "c.parquet", text_key="content")) == ["p1", "p2"]
    with pytest.raises(DataError, match="no column 'text'.*--text-key"):
        list(readers.iter_documents(tmp_path / "c.parquet"))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "z.md").write_text("in subdir", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c.parquet").unlink()
    stats = {}
    got = list(readers.iter_documents(tmp_path, stats=stats))
    # sorted recursive walk over supported extensions: a.txt, b.jsonl, sub/z.md (ignored.bin skipped)
    assert got == ["first block\nline two", "second block", "third", "j1", "j2", "in subdir"]
    assert stats["files"] == 3
    assert list(readers.iter_documents(str(tmp_path / "*.jsonl"))) == ["j1", "j2"]
    assert list(readers.iter_documents([tmp_path / "b.jsonl", sub / "z.md"])) == ["j1", "j2", "in subdir"]


def test_dir_with_parquet_missing_column_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["p1"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet.*no column 'text'"):
        list(readers.iter_documents(tmp_path))


def test_bad_jsonl_lines(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "good"}\nnot json\n{"other": 1}\n[1, 2]\n{"text": "also good"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{f}:2: not valid JSON.*--skip-bad-lines"):
        list(readers.iter_documents(f))
    stats = {}
    assert list(readers.iter_documents(f, skip_bad_lines=True, stats=stats)) == ["good", "also good"]
    assert stats["bad_lines"] == 3
    f2 = tmp_path / "nokey.jsonl"
    f2.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{f2}:1: line has no string field 'text' \(keys: content\)"):
        list(readers.iter_documents(f2))


def test_non_utf8_empty_and_missing(tmp_path):
    f = tmp_path / "mixed.txt"
    # a few stray bytes in a text file are replaced and counted (a mostly-binary file is refused:
    # test_binary_files_are_refused_as_text_with_what_to_pass)
    body = ("plain English text. " * 30).strip()
    f.write_bytes(b"caf\xe9 ok\n\n\xff\xfe broken \xc3\n\n" + body.encode())
    stats = {}
    docs = list(readers.iter_documents(f, stats=stats))
    assert docs == ["caf\ufffd ok", "\ufffd\ufffd broken \ufffd", body]
    assert stats["bad_utf8_bytes"] == 4
    e = tmp_path / "empty.txt"
    e.write_text("")
    stats = {}
    assert list(readers.iter_documents(e, stats=stats)) == [] and stats["empty_files"] == 1
    with pytest.raises(DataError, match="nope.txt: no such file"):
        list(readers.iter_documents(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="glob matched no files"):
        list(readers.iter_documents(str(tmp_path / "*.parquet")))


def test_hf_source_offline_error_is_clear(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import common, readers, scoring\n"
            "try:\n list(readers.iter_documents('hf:someone/some_dataset'))\n"
            "except common.DataError as e: print('DataError:', e)\n"
            "try:\n scoring.load_eval_texts('wikitext2')\n"
            "except scoring.ScoringError as e: print('DataError:', e)\n") % str(ROOT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = [l for l in r.stdout.splitlines() if l.startswith("DataError:")]
    assert len(lines) == 2, r.stdout + r.stderr
    assert "someone/some_dataset" in lines[0] and "local files" in lines[0]
    assert "wikitext-2-raw-v1" in lines[1] and "local file" in lines[1]


def test_python_docs_source_is_deterministic_and_large():
    a = list(readers.iter_documents("python-docs"))
    b = list(readers.iter_python_docs())
    assert a == b
    total = sum(len(d.encode("utf-8")) for d in a)
    assert total > 1_500_000 and len(a) > 200
    assert len(set(a)) == len(a)
    assert any("Module json" in d for d in a)


# ------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_dict_round_trip_and_hash(tiny_tokenizer, tmp_path):
    d = tiny_tokenizer.to_dict()
    assert set(d) == {"tokenizer_json", "tokenizer_config"} and all(isinstance(v, str) for v in d.values())
    t2 = text_tokenizer.TextTokenizer.from_dict(d)
    assert t2.hash == tiny_tokenizer.hash and t2.vocab_size == tiny_tokenizer.vocab_size
    t2.save(tmp_path / "saved")
    t3 = text_tokenizer.load_tokenizer(tmp_path / "saved" / "tokenizer.json")
    assert t3.hash == tiny_tokenizer.hash and t3.chat_template == tiny_tokenizer.chat_template
    with pytest.raises(DataError, match="no tokenizer.json"):
        text_tokenizer.load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="tokenizer not found"):
        text_tokenizer.load_tokenizer(tmp_path / "missing")


def test_encode_chat_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hello again."}]
    ids, mask = tok.encode_chat(msgs)
    assert ids == tok.encode(tok.apply_chat_template(msgs), allow_special=True)
    assert len(ids) == len(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hi there!<|im_end|>Hello again.<|im_end|>"
    ids_g, mask_g = tok.encode_chat(msgs[:2], add_generation_prompt=True)
    assert tok.decode(ids_g).endswith("<|im_start|>assistant\n") and sum(mask_g) == 0
    # control strings typed in a message stay text
    ids2, _ = tok.encode_chat([{"role": "user", "content": "<|im_end|><|im_start|>assistant"}])
    assert ids2.count(tok.im_end_id) == 1 and ids2.count(tok.im_start_id) == 1
    with pytest.raises(DataError, match="message 0"):
        tok.encode_chat([{"role": "user"}])


# ------------------------------------------------------------------------------------ .bin files

def test_token_file_round_trip_and_header(tmp_path):
    p = tmp_path / "t.bin"
    n = token_data.write_token_file(p, [[5, 6, 7], np.array([0, 65535], dtype=np.int64), [], 3, 4], 65536 - 1 + 1)
    assert n == 7
    h = token_data.read_token_header(p)
    assert h["n_tokens"] == 7 and h["dtype"] == "uint32" and h["vocab_size"] == 65536 and h["n_docs"] == 1
    assert token_data.read_token_file(p).tolist() == [5, 6, 7, 0, 65535, 3, 4]
    p16 = tmp_path / "t16.bin"
    token_data.write_token_file(p16, [list(range(512))], 512)
    arr = token_data.read_token_file(p16)
    assert arr.dtype == np.uint16 and arr.tolist() == list(range(512))
    assert p16.stat().st_size == token_data.BIN_HEADER_SIZE + 2 * 512
    # header layout as documented in docs/DATA_FORMAT.md
    raw = p16.read_bytes()[:token_data.BIN_HEADER_SIZE]
    assert raw[:8] == b"FISHTOK\x00"
    assert int.from_bytes(raw[8:12], "little") == 1 and int.from_bytes(raw[12:16], "little") == 2
    assert int.from_bytes(raw[16:24], "little") == 512 and int.from_bytes(raw[24:32], "little") == 512


def test_token_file_bad_inputs(tmp_path):
    p = tmp_path / "t.bin"
    token_data.write_token_file(p, [[1, 2, 3, 4]], 512)
    data = p.read_bytes()
    bad = tmp_path / "bad_magic.bin"
    bad.write_bytes(b"NOTFISH!" + data[8:])
    with pytest.raises(DataError, match="bad_magic.bin: not a FishAI token file"):
        token_data.read_token_file(bad)
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(data[:-3])
    with pytest.raises(DataError, match="trunc.bin: truncated"):
        token_data.read_token_file(trunc)
    ver = tmp_path / "ver.bin"
    ver.write_bytes(data[:8] + (7).to_bytes(4, "little") + data[12:])
    with pytest.raises(DataError, match="version 7"):
        token_data.read_token_file(ver)
    short = tmp_path / "short.bin"
    short.write_bytes(b"FISH")
    with pytest.raises(DataError, match="short.bin"):
        token_data.read_token_file(short)
    # an out-of-range id aborts the write and leaves nothing behind
    out = tmp_path / "oor.bin"
    with pytest.raises(DataError, match="outside the vocabulary"):
        token_data.write_token_file(out, [[1, 2], [600]], 512)
    assert not out.exists() and not list(tmp_path.glob(".oor.bin*"))


# ------------------------------------------------------------------------------------- samplers

def test_token_window_sampler_exact_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    s = token_data.TokenWindowSampler(tokens, seq_len=16, batch_size=4, seed=7)
    batches = [s.next_batch() for _ in range(6)]
    for x, y in batches:
        assert x.shape == (4, 16) and x.dtype.is_floating_point is False
        assert (y[:, :-1] == x[:, 1:]).all()
        assert ((x[:, 1:] - x[:, :-1]) == 1).all()   # windows are contiguous slices of the data
        assert int(x.min()) >= 0 and int(y.max()) <= 999
    assert s.state_dict() == {"seed": 7, "step": 6}
    s2 = token_data.TokenWindowSampler(tokens, seq_len=16, batch_size=4, seed=7)
    s2.load_state_dict({"seed": 7, "step": 3})
    for i in range(3, 6):
        x2, y2 = s2.next_batch()
        assert (x2 == batches[i][0]).all() and (y2 == batches[i][1]).all()
    other_rank = token_data.TokenWindowSampler(tokens, 16, 4, seed=7, rank=1, world_size=2)
    assert not (other_rank.next_batch()[0] == batches[0][0]).all()
    # starts lie in [0, len - seq_len - 1]: with len == seq_len + 1 the only window is the whole array
    tight = token_data.TokenWindowSampler(np.arange(17), seq_len=16, batch_size=3)
    x, y = tight.next_batch()
    assert (x == np.arange(16)).all() and (y == np.arange(1, 17)).all()
    with pytest.raises(DataError, match="need at least seq_len\\+1"):
        token_data.TokenWindowSampler(np.arange(16), seq_len=16, batch_size=1)
    starts = np.concatenate([s.batch_indices(i) for i in range(500)])
    assert starts.min() == 0 and starts.max() == 1000 - 16 - 1


def test_sampler_reads_bin_path(tmp_path):
    p = tmp_path / "t.bin"
    token_data.write_token_file(p, [np.arange(300) % 512], 512)
    x, y = token_data.TokenWindowSampler(p, seq_len=8, batch_size=2, seed=1).next_batch()
    assert x.shape == (2, 8) and ((y - x) == 1).all()


def test_iter_eval_batches_contiguous():
    tokens = np.arange(103)
    batches = list(token_data.iter_eval_batches(tokens, seq_len=10, batch_size=4))
    xs = np.concatenate([x.numpy() for x, _ in batches])
    ys = np.concatenate([y.numpy() for _, y in batches])
    assert xs.shape == (10, 10)                      # (103 - 1) // 10 windows, tail dropped
    assert (xs.reshape(-1) == np.arange(100)).all() and (ys.reshape(-1) == np.arange(1, 101)).all()
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert len(list(token_data.iter_eval_batches(tokens, 10, 4, max_batches=2))) == 2


# ----------------------------------------------------------------------------------- eval texts


# ------------------------------------------------------------------------------------------ SFT

def _conv(i):
    return {"messages": [{"role": "user", "content": f"question {i}?"},
                         {"role": "assistant", "content": "answer " * (1 + i % 4) + str(i)}]}


def test_sft_formats_are_normalised():
    belle = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    alpaca = {"instruction": "Translate", "input": "bonjour", "output": "hello"}
    assert readers.normalize_conversation(belle) == [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]
    assert readers.normalize_conversation(alpaca) == [{"role": "user", "content": "Translate\n\nbonjour"},
                                                 {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match="unknown role"):
        readers.normalize_conversation({"messages": [{"role": "wizard", "content": "x"}]})
    with pytest.raises(DataError, match="no 'messages'"):
        readers.normalize_conversation({"text": "x"})


def test_sft_packing_masks_and_doc_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    convs = [_conv(i) for i in range(40)]
    ds = token_data.SFTDataset(convs, tok, seq_len=96, batch_size=3, seed=3)
    encoded = {tuple(tok.encode_chat(readers.normalize_conversation(c))[0]) for c in convs}
    seen_segments = 0
    for _ in range(4):
        x, y, m, d = ds.next_batch()
        assert x.shape == y.shape == m.shape == d.shape == (3, 96)
        for b in range(3):
            row_d = d[b].tolist()
            assert row_d == sorted(row_d)                         # segments are contiguous, numbered 0..k
            for k in sorted(set(row_d)):
                pos = [t for t, v in enumerate(row_d) if v == k]
                xs, ys, ms = x[b, pos].tolist(), y[b, pos].tolist(), m[b, pos].tolist()
                if all(v == common.IGNORE_INDEX for v in ys):        # padding segment
                    assert sum(ms) == 0 and set(xs) == {tok.pad_id}
                    continue
                seen_segments += 1
                full = tuple(xs + ys[-1:])
                assert full in encoded                            # a whole conversation, never split
                assert ys == list(full[1:])                       # targets stay inside the conversation
                masked = tok.decode([t for t, mm in zip(ys, ms) if mm])
                assert masked.startswith("answer") and masked.endswith("<|im_end|>")
                assert masked.count("<|im_end|>") == 1
            assert d[b].max() >= 1  # packing put several conversations (or conversation + padding) in a row
    assert seen_segments > 12
    try:
        import model
        assert common.IGNORE_INDEX == model.IGNORE_INDEX
    except ImportError:
        pass


def test_sft_resume_and_no_pack(tiny_tokenizer, tmp_path):
    f = tmp_path / "chat.jsonl"
    with open(f, "w", encoding="utf-8") as fh:
        for i in range(25):
            fh.write(json.dumps(_conv(i)) + "\n")
        fh.write(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    a = token_data.SFTDataset(f, tiny_tokenizer, seq_len=64, batch_size=2, seed=5)
    assert len(a) == 25 and a.stats["dropped_no_assistant"] == 1
    for _ in range(7):  # crosses an epoch boundary
        a.next_batch()
    state = a.state_dict()
    assert set(state) == {"seed", "epoch", "cursor", "step"} and all(isinstance(v, int) for v in state.values())
    ref = [a.next_batch() for _ in range(3)]
    b = token_data.SFTDataset(f, tiny_tokenizer, seq_len=64, batch_size=2, seed=5)
    b.load_state_dict(state)
    for r in ref:
        got = b.next_batch()
        assert all((g == t).all() for g, t in zip(got, r))
    c = token_data.SFTDataset(f, tiny_tokenizer, seq_len=64, batch_size=2, pack=False)
    x, y, m, d = c.next_batch()
    assert set(d[0].tolist()) <= {0, 1} and (y[d == 1] == common.IGNORE_INDEX).all()
    long = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 300}]}]
    t = token_data.SFTDataset(long * 2, tiny_tokenizer, seq_len=32, batch_size=1)
    assert t.stats["truncated"] == 2 and t.next_batch()[2].sum() > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_conv(1)) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2"):
        token_data.SFTDataset(bad, tiny_tokenizer, 64, 2)


# ---------------------------------------------------------------------------------- filter / mix

def test_filter_rules_and_counts():
    f = du.DataFilter(min_chars=30, max_chars=2000)
    base = "The quick brown fox jumps over the lazy dog near the river bank."
    docs = {
        base: True,
        "The  quick brown fox jumps over the lazy dog near the river bank.\n": False,  # duplicate (ws/case)
        "short": False,                                                      # too_short
        "x" * 2500: False,                                                   # too_long
        "1234567890 1234567890 1234567890 abc def": False,                   # digit_ratio
        "#### $$$$ %%%% &&&& **** ++++ ==== <<<< >>>> text": False,            # special_ratio
        "Это русский текст, который не латиница и не китайский язык.": False,  # script
        "这是一段中文文本，用来测试语言过滤器是否保留中日韩文字，长度要超过三十个字符才行。": True,
        "Mixed English text with a few 中文 characters is still fine here.": True,
    }
    got = [f.keep(d) for d in docs]
    assert got == list(docs.values())
    rep = f.report()
    assert rep["seen"] == 9 and rep["kept"] == 3
    assert rep["dropped"] == {"too_short": 1, "too_long": 1, "digit_ratio": 1, "special_ratio": 1, "script": 1,
                              "duplicate": 1, "near_duplicate": 0}
    assert "duplicate 1" in f.format_report()


def test_filter_near_duplicates():
    words = readers.iter_python_docs()
    long_doc = next(d for d in words if len(d.split()) > 400)
    text = " ".join(long_doc.split()[:400])
    edited = text.replace(" the ", " a ", 2)
    other = " ".join(long_doc.split()[400:800]) or "completely different " * 100
    f = du.DataFilter(near_dedup=True, max_special_ratio=None, max_digit_ratio=None, scripts=None)
    assert [f.keep(t) for t in (text, edited, other)] == [True, False, True]
    assert f.dropped["near_duplicate"] == 1
    off = du.DataFilter(max_special_ratio=None, max_digit_ratio=None, scripts=None)
    assert [off.keep(t) for t in (text, edited)] == [True, True]


def test_filter_spec_parsing():
    assert du.DataFilter.from_spec("none") is None
    f = du.DataFilter.from_spec("default,min_chars=5,near_dedup=1,scripts=latin+cyrillic,max_digit_ratio=off")
    assert f.cfg["min_chars"] == 5 and f.cfg["near_dedup"] is True
    assert f.cfg["scripts"] == ("latin", "cyrillic") and f.cfg["max_digit_ratio"] is None
    with pytest.raises(DataError, match="unknown option 'foo'"):
        du.DataFilter.from_spec("foo=1")
    with pytest.raises(DataError, match="unknown script"):
        du.DataFilter(scripts="klingon")


def test_mixer_shares_exhaustion_and_upsampling():
    a = [f"a{i} " + "alpha " * 20 for i in range(300)]
    b = [f"b{i} " + "beta " * 20 for i in range(300)]
    c = [f"c{i} " + "gamma " * 20 for i in range(5)]
    m = du.DataMixer({"a": (0.5, a), "b": (0.3, b), "c": (0.2, c)}, target_docs=200)
    out = list(m)
    rep = m.report()
    assert len(out) == 200 and rep["stop_reason"] == "target_docs"
    assert rep["exhausted"] == {"c": rep["exhausted"]["c"]} and rep["sources"]["c"]["docs"] == 5
    assert abs(rep["sources"]["a"]["share"] / rep["sources"]["b"]["share"] - 5 / 3) < 0.1
    assert "EXHAUSTED" in m.format_report()
    assert out == list(du.DataMixer({"a": (0.5, a), "b": (0.3, b), "c": (0.2, c)}, target_docs=200))
    up = du.DataMixer({"a": (0.5, a), "b": (0.3, b), "c": (0.2, c)}, target_docs=200, upsample=True)
    list(up)
    r2 = up.report()
    assert r2["exhausted"] == {} and r2["sources"]["c"]["passes"] > 5
    assert abs(r2["sources"]["c"]["share"] - 0.2) < 0.03 and "UP-SAMPLED" in up.format_report()
    # shares count tokens (calibrated with count_tokens), not bytes; record() gives the report exact counts
    m3 = du.DataMixer({"a": (0.5, a), "b": (0.5, b)}, target_tokens=3000,
                      count_tokens=lambda t: 10 if t.startswith("a") else 30)
    for name, text in m3:
        m3.record(name, 10 if name == "a" else 30, len(text.encode()))
    r3 = m3.report()["sources"]
    assert abs(r3["a"]["share"] - 0.5) < 0.05 and r3["a"]["docs"] > 2 * r3["b"]["docs"]
    assert du.parse_mix("web=0.5:a/,code=0.2:b.jsonl") == {"web": (0.5, "a/"), "code": (0.2, "b.jsonl")}
    with pytest.raises(DataError, match="--mix"):
        du.parse_mix("web:a/")


# -------------------------------------------------------------------------------------- prepare

def test_prepare_end_to_end(tiny_tokenizer_dir, tiny_tokenizer, corpus_dir, tmp_path, other_tokenizer):
    out = tmp_path / "data"
    meta = du.prepare([corpus_dir], tiny_tokenizer_dir, out, val_fraction=0.1, show_progress=False, log=None)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train.bin", "val.bin"]
    docs = list(readers.iter_documents(corpus_dir))
    assert meta["train"]["docs"] + meta["val"]["docs"] == len(docs) == 30
    assert meta["val"]["docs"] == 3
    train, val = token_data.read_token_file(out / "train.bin"), token_data.read_token_file(out / "val.bin")
    assert len(train) == meta["train"]["tokens"] and len(val) == meta["val"]["tokens"]
    # every document is encoded exactly and followed by EOS; split is by whole document
    expected = [tiny_tokenizer.encode(d) + [0] for d in docs]
    val_idx = [i for i in range(len(docs)) if du.holdout_split(i, 0.1) == "val"]
    assert list(val) == [t for i in val_idx for t in expected[i]]
    assert list(train) == [t for i, e in enumerate(expected) if i not in val_idx for t in e]
    assert tiny_tokenizer.decode(train).split("<|endoftext|>")[0] == docs[1]
    assert meta["tokenizer_hash"] == tiny_tokenizer.hash and meta["vocab_size"] == 512
    assert token_data.check_meta(out, tiny_tokenizer)["train"]["tokens"] == len(train)
    assert token_data.check_meta(json.loads((out / "meta.json").read_text()), tiny_tokenizer, path=out)
    assert text_tokenizer.load_tokenizer(out / "tokenizer").hash == tiny_tokenizer.hash
    with pytest.raises(DataError, match="different tokenizer"):
        token_data.check_meta(out, other_tokenizer)
    # existing output is refused without overwrite, replaced with it
    with pytest.raises(common.FishAIError, match="--overwrite"):
        du.prepare([corpus_dir], tiny_tokenizer_dir, out, show_progress=False, log=None)
    meta2 = du.prepare([corpus_dir], tiny_tokenizer_dir, out, val_fraction=0.0, overwrite=True,
                       show_progress=False, log=None)
    assert meta2["val"]["docs"] == 0 and meta2["train"]["docs"] == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left


def test_prepare_failure_leaves_nothing(tiny_tokenizer_dir, corpus_dir, tmp_path):
    bad = tmp_path / "in" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine document number one"}\n{oops\n', encoding="utf-8")
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        du.prepare([corpus_dir, bad], tiny_tokenizer_dir, out, show_progress=False, log=None)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    meta = du.prepare([bad], tiny_tokenizer_dir, out, skip_bad_lines=True, val_fraction=0,
                      show_progress=False, log=None)
    assert meta["read_stats"]["bad_lines"] == 1 and meta["train"]["docs"] == 1
    with pytest.raises(DataError, match="filtered out"):
        du.prepare([bad], tiny_tokenizer_dir, tmp_path / "d2", filter="min_chars=1000", skip_bad_lines=True,
                   show_progress=False, log=None)
    assert not (tmp_path / "d2").exists()


def test_prepare_mix_filter_cli(tiny_tokenizer_dir, corpus_dir, tmp_path):
    code = tmp_path / "code.jsonl"
    with open(code, "w", encoding="utf-8") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"def func_{i}(x):\n    return x * {i} + helper(x)  # compute value"}) + "\n")
            if i == 1:  # an exact duplicate early on: the filter must drop and count it
                f.write(json.dumps({"text": "def func_0(x):\n    return x * 0 + helper(x)  # compute value"}) + "\n")
    out = tmp_path / "mixed"
    r = run_cli("prepare", "--mix", f"books=0.6:{corpus_dir},code=0.4:{code}", "--tokenizer", tiny_tokenizer_dir,
                "--output", out, "--filter", "default", "--target-tokens", "3000", "--no-progress",
                "--val-fraction", "0.05")
    assert r.returncode == 0, r.stderr
    assert "duplicate" in r.stdout and "achieved token share" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    src = meta["mix"]["sources"]
    assert meta["mix"]["stop_reason"] == "target_tokens"
    assert abs(src["books"]["share"] - 0.6) < 0.1 and abs(src["code"]["share"] - 0.4) < 0.1
    assert abs(meta["train"]["tokens"] + meta["val"]["tokens"] - 3000) < 400  # "about" the target
    st = run_cli("stats", out / "train.bin", "--json", tmp_path / "st.json")
    assert st.returncode == 0 and "tokens" in st.stdout and "hash ok" in st.stdout
    assert json.loads((tmp_path / "st.json").read_text())["n_tokens"] == meta["train"]["tokens"]
    # errors: one line, no traceback, non-zero exit
    r = run_cli("prepare", "--input", corpus_dir, "--tokenizer", tiny_tokenizer_dir, "--output", out, "--no-progress")
    assert r.returncode != 0 and r.stderr.startswith("error:") and "--overwrite" in r.stderr
    (tmp_path / "junk.bin").write_bytes(b"garbage" * 20)
    r = run_cli("stats", tmp_path / "junk.bin")
    assert r.returncode != 0 and "junk.bin: not a FishAI token file" in r.stderr and "Traceback" not in r.stderr


def test_hash_set_matches_python_set():
    import random
    s, ref, r = du._U64Set(4), set(), random.Random(0)
    for i in range(5000):
        h = (r.getrandbits(64) if i % 3 else r.getrandbits(8)) or 5   # many repeats among the small ones
        assert s.add(h) == (h not in ref)
        ref.add(h)
    assert len(s) == len(ref) and all(h in s for h in ref) and 123456789 not in s


def test_prepare_ctrl_c_leaves_nothing(tiny_tokenizer_dir, tmp_path):
    import signal
    import time
    out = tmp_path / "data"
    p = subprocess.Popen([sys.executable, str(ROOT / "data_utils.py"), "prepare", "--input", "python-docs", "python-docs",
                          "python-docs", "python-docs", "--tokenizer", str(tiny_tokenizer_dir), "--output", str(out),
                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not any(q.name.startswith(".data.tmp") for q in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let it write some tokens
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_python_docs_corpus_is_identical_across_processes():
    """The main job's corpus (and so its tokenizer hash) must not depend on what else is imported."""
    import subprocess
    import sys
    code = ("import sys, hashlib; sys.path.insert(0, {root!r}); {extra}import readers; h = hashlib.sha256()\n"
            "for d in readers.iter_documents('python-docs'): h.update(d.encode())\nprint(h.hexdigest())")
    root = str(Path(__file__).resolve().parents[1])
    outs = [subprocess.run([sys.executable, "-c", code.format(root=root, extra=extra)], capture_output=True,
                           text=True, timeout=120, check=True).stdout.strip()
            for extra in ("", "import logging, json, email.parser, asyncio; logging.basicConfig(); ")]
    assert len(outs[0]) == 64 and outs[0] == outs[1]


# -------------------------------------------------------------------------------------- CLI conventions
# Every script builds its parser from common's conventions: one-line usage errors with exit code 2,
# every flag explained, defaults shown once, no dangling file names.

SCRIPT_HELP = [("model.py", []), ("train.py", []), ("quick_train.py", []), ("tokenizer_train.py", []),
               ("quantize.py", []), ("benchmark.py", ["self-test"]), ("benchmark.py", ["full"]),
               ("benchmark.py", ["data"]), ("reference_benchmark.py", []), ("evaluate.py", []),
               ("generate.py", []), ("data_utils.py", ["prepare"]), ("data_utils.py", ["stats"])]
BAD_NUMBERS = [("train.py", ["--batch-size", "0"]), ("quick_train.py", ["--max-steps", "-1"]),
               ("tokenizer_train.py", ["--data", "x", "--vocab-size", "-5"]), ("quantize.py", ["--group-size", "0"]),
               ("benchmark.py", ["self-test", "--repeat", "0"]), ("benchmark.py", ["full", "--stride", "-3"]),
               ("reference_benchmark.py", ["--batch-size", "0"]), ("evaluate.py", ["--benchmark", "mmlu", "--limit", "0"]),
               ("generate.py", ["--max-new-tokens", "0"]), ("data_utils.py", ["prepare", "--input", "x", "--tokenizer",
                                                                              "t", "--output", "o", "--val-fraction", "2"])]
def _run_main(script, args, capsys):
    """A script's main(argv) in this process: (exit code, stdout, stderr)."""
    import importlib
    from unittest import mock
    try:
        with mock.patch.object(sys, "argv", [script]):  # argparse names the program after argv[0]
            rc = importlib.import_module(script[:-3]).main(list(args))
    except SystemExit as e:  # argparse's --help and usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _parsers(parser):
    yield parser
    for a in parser._actions:
        if isinstance(a, __import__("argparse")._SubParsersAction):
            for sub in a.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("script,sub", SCRIPT_HELP, ids=[" ".join([s, *a]) for s, a in SCRIPT_HELP])
def test_help_explains_every_flag(script, sub, capsys):
    rc, stdout, stderr = _run_main(script, [*sub, "--help"], capsys)
    assert rc == 0 and stdout.startswith("usage:"), stderr[-500:]
    for name in set(re.findall(r"[\w./-]+\.(?:md|py)\b", stdout)):  # no file that is not in the repo
        assert (ROOT / name).exists() or (ROOT / "docs" / Path(name).name).exists(), f"{script} --help names {name}"
    import importlib
    parser = importlib.import_module(script[:-3]).build_parser()
    for p in _parsers(parser):
        assert isinstance(p, common.ArgumentParser), f"{p.prog}: build it with common.ArgumentParser"
        assert p.formatter_class is common.HelpFormatter, f"{p.prog}: defaults are shown once by common.HelpFormatter"
        for a in p._actions:
            if a.help == "==SUPPRESS==" or a.dest == "help" or not a.option_strings and a.nargs == "A...":
                continue
            if isinstance(a, __import__("argparse")._SubParsersAction):
                continue
            assert a.help and a.help.strip(), f"{p.prog} {a.option_strings or a.dest}: no help text"


@pytest.mark.parametrize("script,args", BAD_NUMBERS, ids=[s for s, _ in BAD_NUMBERS])
def test_bad_numeric_flag_is_one_line_usage_error(script, args, capsys):
    rc, _, stderr = _run_main(script, args, capsys)
    lines = stderr.strip().splitlines()
    assert rc == common.EXIT_USAGE and len(lines) == 1 and lines[0].startswith("error: argument "), stderr


def test_chat_jsonl_is_rendered_with_the_template_and_encoded_safely(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi <|im_end|> there"}, {"role": "assistant", "content": "Hello!"}]},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {"text": "a plain document in the same file"}]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    docs = list(readers.iter_documents(f))
    assert docs[0] == tiny_tokenizer.apply_chat_template(rows[0]["messages"]) and isinstance(docs[0], text_tokenizer.ChatDocument)
    assert docs[1].startswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4") and docs[2] == rows[2]["text"]
    meta = du.prepare([f], tiny_tokenizer_dir, tmp_path / "data", val_fraction=0, show_progress=False, log=None)
    ids = token_data.read_token_file(tmp_path / "data" / "train.bin").tolist()
    first = tiny_tokenizer.encode_chat(rows[0]["messages"])[0]
    assert ids[:len(first) + 1] == first + [tiny_tokenizer.eos_id] and meta["train"]["docs"] == 3
    # the <|im_end|> typed inside the user's message stays text: control ids only from the template
    assert first.count(tiny_tokenizer.im_end_id) == 2 and first.count(tiny_tokenizer.im_start_id) == 2


def test_tokenize_documents_from_files_and_memory(tiny_tokenizer, text_file):
    docs = list(readers.iter_documents(text_file))
    from_file = du.tokenize_documents(text_file, tiny_tokenizer, val_fraction=0.1, show_progress=False)
    from_list = du.tokenize_documents(docs, tiny_tokenizer, val_fraction=0.1, show_progress=False)
    assert all(np.array_equal(from_file[k], from_list[k]) for k in ("train", "val"))
    expect_val = [t for i, d in enumerate(docs) if du.holdout_split(i, 0.1) == "val"
                  for t in tiny_tokenizer.encode(d) + [tiny_tokenizer.eos_id]]
    assert from_list["val"].tolist() == expect_val and len(from_list["train"]) > 5 * len(expect_val)
    capped = du.tokenize_documents(docs, tiny_tokenizer, max_tokens=2000, show_progress=False)
    assert 1500 <= len(capped["train"]) + len(capped["val"]) <= 4000  # the target is estimated per document


def test_prepare_progress_shows_percent_and_time_left(tiny_tokenizer_dir, corpus_dir, tmp_path, capsys):
    """Input sizes are known for local files, so the bar has a total: percent and time left."""
    du.prepare([corpus_dir], tiny_tokenizer_dir, tmp_path / "data", show_progress=True, log=None)
    err = capsys.readouterr().err
    assert "100%" in err and "<00:00" in err  # tqdm's "[elapsed<left]" needs a total
    assert du._input_bytes([corpus_dir]) == sum(p.stat().st_size for p in corpus_dir.iterdir())
    assert du._input_bytes(["python-docs"]) is None  # a stream: no total, no percent


def test_prefetch_keeps_order_raises_where_the_reader_failed_and_stops_early():
    def reader(fail_at=None):
        for i in range(10):
            if i == fail_at:
                raise DataError(f"bad document {i}")
            yield i

    assert list(du._prefetch(reader())) == list(range(10))
    got = []
    with pytest.raises(DataError, match="bad document 6"):
        for item in du._prefetch(reader(fail_at=6)):
            got.append(item)
    assert got == [0, 1, 2, 3, 4, 5]                 # every item before the failure, in order
    it = du._prefetch(iter(range(10**9)))           # a consumer that stops early does not wait for the rest
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()


def test_overwrite_never_deletes_what_the_user_had(tiny_tokenizer_dir, corpus_dir, tmp_path):
    """prepare --overwrite replaces only its own files: an output that is (or holds, or lies inside)
    an input is refused, and so is one holding anything prepare did not write, with the list."""
    books = tmp_path / "mybooks"
    shutil.copytree(corpus_dir, books)
    (books / "notes.txt").write_text("my notes")
    before = {p.name: p.read_bytes() for p in books.iterdir()}
    for out in (books, books / "sub", tmp_path):  # is, lies inside, contains the input
        r = run_cli("prepare", "--input", f"{books}/", "--tokenizer", tiny_tokenizer_dir, "--output", out,
                    "--overwrite", "--quiet")
        how = "is" if out == books else "lies inside" if out == books / "sub" else "contains"
        assert r.returncode == 2 and r.stderr.strip() == (
            f"error: --output {out}: {how} the input --input {books}/; an output never replaces an input, even "
            "with --overwrite: write it apart from the inputs"), r.stderr
    assert {p.name: p.read_bytes() for p in books.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (other / "train.bin").write_bytes(b"old")
    r = run_cli("prepare", "--input", books, "--tokenizer", tiny_tokenizer_dir, "--output", other, "--overwrite",
                "--quiet")
    assert r.returncode == 2 and "holds files that this command did not write (keep.txt, train.bin)" in r.stderr
    (other / "train.bin").unlink()
    r = run_cli("prepare", "--input", books, "--tokenizer", tiny_tokenizer_dir, "--output", other, "--overwrite",
                "--quiet")
    assert r.returncode == 2 and "holds files that this command did not write (keep.txt)" in r.stderr
    assert (other / "keep.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    # its own output is replaced with --overwrite (and only with it)
    data = tmp_path / "data"
    assert run_cli("prepare", "--input", books, "--tokenizer", tiny_tokenizer_dir, "--output", data,
                   "--quiet").returncode == 0
    r = run_cli("prepare", "--input", books, "--tokenizer", tiny_tokenizer_dir, "--output", data, "--quiet")
    assert r.returncode == 2 and ("already holds another run's files (meta.json, tokenizer, train.bin, val.bin); "
                                  "pass --overwrite to replace them") in r.stderr
    assert run_cli("prepare", "--input", books, "--tokenizer", tiny_tokenizer_dir, "--output", data, "--overwrite",
                   "--quiet").returncode == 0
    assert sorted(p.name for p in data.iterdir()) == sorted(du.PREPARED_NAMES)




def test_holdout_rule_counts_and_order():
    # the hold-out rule: exact counts, disjoint splits, the first document held out
    splits = [du.holdout_split(i, 0.1, 0.05) for i in range(200)]
    assert splits.count("val") + splits.count("test") == 30 and splits.count("test") == 10
    assert splits[0] == "test" and [du.holdout_split(i, 0.1) for i in range(3)] == ["val", "train", "train"]


# ----------------------------------------------------------------------------------------------
# files are what they claim (issue 23)

def test_binary_files_are_refused_as_text_with_what_to_pass(tiny_tokenizer_dir, tmp_path, tiny_ckpt):
    data = tmp_path / "data"
    du.prepare([str(ROOT / "README.md")], str(tiny_tokenizer_dir), str(data), val_fraction=0.1, show_progress=False,
               log=None)
    with pytest.raises(DataError, match=rf"^{data / 'train.bin'} is a prepared token file .*pass its folder, {data}/"):
        list(readers.iter_documents(str(data / "train.bin")))
    with pytest.raises(DataError, match=r"is a PyTorch checkpoint \(.pt, as train.py writes\), not text: pass it as "
                                        "--model"):
        list(readers.iter_documents(str(tiny_ckpt)))
    for head, kind in ((b"FISHAIQ\x00", r"a quantized model \(quantize.py --format bin\)"),
                       (b"GGUF\x03\x00\x00\x00", r"a GGUF model \(quantize.py --format gguf\)"),
                       (len(b'{"a": 1}').to_bytes(8, "little") + b'{"a": 1}', "a safetensors weights file")):
        f = tmp_path / f"x{len(head)}.txt"
        f.write_bytes(head + b"\0" * 64)
        with pytest.raises(DataError, match=f"is {kind}, not text"):
            list(readers.iter_documents(str(f)))
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(128, 256)) * 40 + b"some text")
    with pytest.raises(DataError, match=r"noise.txt: \d+\.\d% of its first 5,129 bytes are not UTF-8 text"):
        list(readers.iter_documents(str(noise)))
    mostly = tmp_path / "mostly.txt"  # a stray undecodable byte in real text is not refused (under 1%)
    mostly.write_bytes(b"plain text " * 200 + b"\xff" + b" more text\n")
    assert len(list(readers.iter_documents(str(mostly)))) == 1


def test_a_checkpoint_can_stand_for_its_tokenizer(tiny_ckpt, tiny_tokenizer, tmp_path):
    assert text_tokenizer.load_tokenizer(tiny_ckpt).hash == tiny_tokenizer.hash  # the tokenizer train.py embeds
    q = tmp_path / "m.bin"
    q.write_bytes(b"FISHAIQ\x00" + b"\0" * 32)
    with pytest.raises(DataError, match=r"m.bin is a quantized model \(quantize.py --format bin\), not a tokenizer: pass the "
                                        "tokenizer directory"):
        text_tokenizer.load_tokenizer(q)


def test_a_file_without_blank_lines_gets_a_note_and_txt_mode_line(tmp_path):
    f = tmp_path / "lines.txt"
    f.write_text("".join(f"sentence number {i} of the corpus.\n" for i in range(150)))
    stats = {}
    assert len(list(readers.iter_documents(str(f), stats=stats))) == 1
    assert "lines.txt: no blank line in 100+ lines, so read as ONE document" in readers.one_block_note(stats)
    assert "--txt-mode line" in readers.one_block_note(stats)
    assert len(list(readers.iter_documents(str(f), txt_mode="line"))) == 150
