"""Tests for generate.py: streaming, sampling, chat and the CLI.

Run alone: python -m pytest tests/test_generate.py -q
"""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
import scoring  # noqa: E402
from conftest import assert_parser_refuses  # noqa: E402
from text_tokenizer import IncrementalDecoder  # noqa: E402
from generate import (chat_loop, fit_generation_prompt, generate_samples,  # noqa: E402
                      make_generator, stream_generate, stream_text, trim_history)
import engine  # noqa: E402

UTF8_TEXT = "Fish 🐟 swim in 水里, naïve café — 中文测试 😀🎉 done. Ελληνικά, עברית, 日本語です。"


def run_cli(*args, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          cwd=str(ROOT), env=env)


def fake_stream(rows: list[list[int]], calls: list | None = None):
    """A token stream that ignores the model and yields the given ids per row, step by step
    (then keeps yielding the last id of each row), recording the prompt it was called with."""
    def stream(idx):
        if calls is not None:
            calls.append(idx.clone())
        step = 0
        while True:
            yield torch.tensor([r[min(step, len(r) - 1)] for r in rows], dtype=torch.long)
            step += 1
    return stream


class FakeModel(torch.nn.Module):
    """Just enough of a GPT for the chat loop and the stop logic: a tokenizer, a config and a
    parameter (for the device)."""

    def __init__(self, tokenizer, max_seq_len=128):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.config = type("Cfg", (), {"max_seq_len": max_seq_len})()


def crafted_model(tiny_model, token_id: int):
    """A copy of the tiny GPT whose weights make greedy decoding always emit `token_id`: the
    blocks write nothing to the residual stream, the final norm keeps one dimension d0, every
    embedding is +1 on d0 and `token_id`'s is +10, so its logit is the largest."""
    m = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.wo.weight.zero_()
            layer.mlp.w_down.weight.zero_()
        m.norm.weight.zero_()
        m.norm.weight[0] = 1.0
        m.tok_emb.weight[:, 0] = 1.0
        m.tok_emb.weight[token_id, 0] = 10.0
    return m


@pytest.fixture(scope="module")
def im_end_ckpt(tiny_model, tmp_path_factory):
    """Checkpoint of a model that answers every chat message with <|im_end|> at once."""
    from model import save_checkpoint

    path = tmp_path_factory.mktemp("imend") / "imend.pt"
    save_checkpoint(path, crafted_model(tiny_model, tiny_model.tokenizer.im_end_id),
                    tokenizer=tiny_model.tokenizer)
    return path


# ------------------------------------------------------------------------------------------
# incremental decoding


def test_incremental_decoder_utf8_roundtrip(tiny_tokenizer):
    ids = tiny_tokenizer.encode(UTF8_TEXT)
    dec = IncrementalDecoder(tiny_tokenizer)
    pieces, held = [], 0
    for t in ids:
        piece = dec.push(t)
        held += piece == ""
        assert "\ufffd" not in piece
        pieces.append(piece)
        so_far = "".join(pieces)
        assert UTF8_TEXT.startswith(so_far)  # never prints anything it must take back
    pieces.append(dec.flush())
    assert "".join(pieces) == UTF8_TEXT
    # vocab 512 splits Chinese/emoji into byte tokens, so some tokens must have been held back
    assert held > 0


def test_incremental_decoder_flushes_invalid_utf8(tiny_tokenizer):
    ids = tiny_tokenizer.encode("🐟")
    assert len(ids) > 1, "the 4-byte emoji should span several byte-level tokens"
    dec = IncrementalDecoder(tiny_tokenizer)
    assert dec.push(ids[0]) == ""
    tail = dec.flush()
    assert tail == tiny_tokenizer.decode(ids[:1]) and tail.endswith("\ufffd")


def test_stream_text_matches_decode_on_random_model(tiny_model):
    """A random model happily emits broken UTF-8; the pieces must still add up to decode()."""
    tok = tiny_model.tokenizer
    prompt = tok.encode("Hello 世界")
    for seed in range(3):
        gen = make_generator(seed, "cpu")
        ids: list[int] = []
        steps = stream_generate(tiny_model, prompt, 40, temperature=1.0, top_k=None,
                                stop_ids=[], generator=gen)
        pieces = list(stream_text(tok, steps, ids_out=ids))
        assert len(ids) == 40
        assert "".join(pieces) == tok.decode(ids)
        # invalid bytes may show up as U+FFFD mid-text, but a piece never *ends* in one while
        # more tokens follow (that would be a character cut in half)
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])


# ------------------------------------------------------------------------------------------
# token generation


def test_greedy_matches_model_generate(tiny_model):
    tok = tiny_model.tokenizer
    prompt = tok.encode("The quick brown fox")
    ref = engine.generate(tiny_model, torch.tensor([prompt]), 30, temperature=0.0)[0, len(prompt):].tolist()
    ours = generate_samples(tiny_model, prompt, 30, temperature=0.0, stop_ids=[])
    assert ours == [ref]
    # batched greedy samples are identical rows
    batch = generate_samples(tiny_model, prompt, 30, temperature=0.0, stop_ids=[], num_samples=3)
    assert batch == [ref] * 3


def test_stops_at_eos_with_real_model(tiny_model):
    tok = tiny_model.tokenizer
    m = crafted_model(tiny_model, tok.eos_id)
    prompt = tok.encode("The history of the")
    ref = engine.generate(m, torch.tensor([prompt]), 20, temperature=0.0, eos_id=tok.eos_id)[0, len(prompt):]
    assert ref.tolist() == [tok.eos_id]  # model.generate stops as soon as every row is done
    steps = list(stream_generate(m, prompt, 20, temperature=0.0, num_samples=2))
    assert steps == [[tok.eos_id, tok.eos_id]]  # default stop id = the tokenizer's EOS
    assert generate_samples(m, prompt, 20, temperature=0.0) == [[]]  # the EOS is not returned
    assert generate_samples(m, prompt, 20, temperature=0.0, keep_stop=True) == [[tok.eos_id]]


def test_static_cache_loop_matches_generate(tiny_model):
    """The --compile decode loop (static KV cache), run eagerly: same greedy tokens, twice
    (the second call reuses the cache and step function), and for a batch."""
    from engine import model_token_stream

    m = copy.deepcopy(tiny_model)
    prompt = torch.tensor([m.tokenizer.encode("A static cache")])
    ref = engine.generate(m, prompt, 25, temperature=0.0)[:, prompt.shape[1]:]
    import unittest.mock
    with unittest.mock.patch.object(torch, "compile", lambda fn, **kw: fn):  # the static step, eagerly
        stream = model_token_stream(m, max_new_tokens=25, temperature=0.0, compile=True)
        for _ in range(2):
            got = torch.stack(list(stream(prompt)), dim=1)
            assert engine.engine_for(m, 1, compile=True).compiled is not None
            assert torch.equal(got, ref)
    got = torch.stack(list(stream(prompt.repeat(2, 1))), dim=1)
    assert torch.equal(got, ref.repeat(2, 1))


def test_same_seed_same_samples(tiny_model):
    prompt = tiny_model.tokenizer.encode("Once upon a time")
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, stop_ids=[], num_samples=3)
    a = generate_samples(tiny_model, prompt, 25, generator=make_generator(7, "cpu"), **kw)
    b = generate_samples(tiny_model, prompt, 25, generator=make_generator(7, "cpu"), **kw)
    c = generate_samples(tiny_model, prompt, 25, generator=make_generator(8, "cpu"), **kw)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1, "the batched samples should differ from each other"
    assert all(len(r) == 25 for r in a)


def test_stop_logic_per_row():
    rows = [[10, 11, 0, 12, 13], [20, 0, 21, 22, 23], [30, 31, 32, 33, 2]]
    model = FakeModel(tokenizer=None)
    steps = list(stream_generate(model, [5], 50, stop_ids=[0, 2], num_samples=3,
                                 token_stream=fake_stream(rows)))
    assert steps == [[10, 20, 30], [11, 0, 31], [0, None, 32], [None, None, 33], [None, None, 2]]
    # max_new_tokens caps the steps even when nothing stops
    assert len(list(stream_generate(model, [5], 4, stop_ids=[], token_stream=fake_stream([[9]])))) == 4
    with pytest.raises(ValueError):
        list(stream_generate(model, [], 4, token_stream=fake_stream([[9]])))


def test_fit_prompt():
    warnings = []
    ids, n = fit_generation_prompt(list(range(100)), 50, 128, warn=warnings.append)
    assert ids == list(range(100))[-78:] and n == 50 and len(warnings) == 1
    ids, n = fit_generation_prompt(list(range(10)), 500, 128, warn=warnings.append)
    assert ids == list(range(10)) and n == 118
    ids, n = fit_generation_prompt(list(range(10)), 20, 128)
    assert (len(ids), n) == (10, 20)


# ------------------------------------------------------------------------------------------
# chat


def test_chat_loop_stops_at_im_end_and_keeps_history(tiny_tokenizer):
    tok = tiny_tokenizer
    reply = tok.encode("Hi there, 鱼!")
    rows = [reply + [tok.im_end_id] + tok.encode(" junk after the end")]
    calls: list = []
    out, err = io.StringIO(), io.StringIO()
    inp = io.StringIO("hello\n\nhow are you?\n/reset\nbye\n/quit\nnever read\n")
    history = chat_loop(FakeModel(tok), inp, out, system="Be brief.", max_new_tokens=50,
                        err_stream=err, token_stream=fake_stream(rows, calls))
    assert out.getvalue() == "Hi there, 鱼!\n" * 3
    assert len(calls) == 3  # the empty line is skipped, /quit stops before "never read"
    second = tok.decode(calls[1][0].tolist())
    assert "hello" in second and "Hi there, 鱼!" in second and "how are you?" in second
    assert "Be brief." in second
    expected = tok.encode_chat([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "Hi there, 鱼!"},
                                {"role": "user", "content": "how are you?"}],
                               add_generation_prompt=True)[0]
    assert calls[1][0].tolist() == list(expected)
    third = tok.decode(calls[2][0].tolist())  # after /reset: only the system prompt and "bye"
    assert "hello" not in third and "bye" in third and "Be brief." in third
    assert "conversation reset" in err.getvalue()
    assert history == [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "bye"},
                       {"role": "assistant", "content": "Hi there, 鱼!"}]


def test_chat_loop_trims_oldest_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [tok.encode("a fairly long answer that takes up space") + [tok.im_end_id]]
    calls: list = []
    out, err = io.StringIO(), io.StringIO()
    msgs = [f"message number {i} with some words" for i in range(8)]
    max_seq_len, max_new = 96, 16
    chat_loop(FakeModel(tok, max_seq_len=max_seq_len), io.StringIO("\n".join(msgs) + "\n"), out,
              max_new_tokens=max_new, err_stream=err, token_stream=fake_stream(rows, calls))
    assert len(calls) == 8
    assert "history trimmed" in err.getvalue()
    for c in calls:
        assert c.shape[1] + max_new <= max_seq_len
    last = tok.decode(calls[-1][0].tolist())
    assert "message number 7" in last and "message number 0" not in last


def test_trim_history_keeps_system_and_newest(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(5):
        msgs += [{"role": "user", "content": f"question {i} " * 5},
                 {"role": "assistant", "content": f"answer {i} " * 5}]
    msgs.append({"role": "user", "content": "final"})
    ids, dropped = trim_history(tok, msgs, reserve=10, max_seq_len=10)  # cannot fit: drop all
    assert dropped == 5
    assert msgs == [{"role": "system", "content": "sys"}, {"role": "user", "content": "final"}]


def test_chat_message_too_long_is_not_sent(tiny_tokenizer):
    tok = tiny_tokenizer
    calls: list = []
    out, err = io.StringIO(), io.StringIO()
    history = chat_loop(FakeModel(tok, max_seq_len=32), io.StringIO("word " * 100 + "\n"), out,
                        err_stream=err, token_stream=fake_stream([[tok.im_end_id]], calls))
    assert calls == [] and history == [] and "message too long" in err.getvalue()


def test_chat_with_crafted_model_stops_at_im_end(tiny_model, monkeypatch):
    tok = tiny_model.tokenizer
    m = crafted_model(tiny_model, tok.im_end_id)
    n_steps = []
    real_stream = engine.generate_stream

    def counting_stream(model, idx, *a, **kw):
        n = 0
        for t in real_stream(model, idx, *a, **kw):
            n += 1
            n_steps.append(n)
            yield t
    monkeypatch.setattr(engine, "generate_stream", counting_stream)
    out, err = io.StringIO(), io.StringIO()
    history = chat_loop(m, io.StringIO("hi\nagain\n"), out, temperature=0.0, max_new_tokens=20,
                        err_stream=err)
    assert out.getvalue() == "\n\n"
    assert max(n_steps) == 1  # stopped right after <|im_end|>, not after 20 tokens
    assert [h["role"] for h in history] == ["user", "assistant", "user", "assistant"]


# ------------------------------------------------------------------------------------------
# command line


def test_cli_prompt_argv_and_stdin_greedy(tiny_ckpt):
    from model import load_model

    m = load_model(tiny_ckpt)
    tok = m.tokenizer
    prompt = "The city of 鱼"
    ids = tok.encode(prompt)
    ref = engine.generate(m, torch.tensor([ids]), 20, temperature=0.0, eos_id=tok.eos_id)[0, len(ids):].tolist()
    if tok.eos_id in ref:
        ref = ref[:ref.index(tok.eos_id)]
    expected = prompt + tok.decode(ref) + "\n"
    common = ["--model", str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "20",
              "--device", "cpu"]
    r = run_cli(*common, "--prompt", prompt)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    assert "tok/s" in r.stderr
    r2 = run_cli(*common, "--prompt", "-", stdin=prompt + "\n")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == expected


def test_cli_chat_piped(im_end_ckpt):
    r = run_cli("--model", str(im_end_ckpt), "--chat", "--temperature", "0", "--system", "Be nice.",
                stdin="hello\nsecond message\n/quit\nnot read\n")
    assert r.returncode == 0, r.stderr
    # piped: the conversation in ChatML (role markers), two empty replies (the model says
    # <|im_end|> at once), then /quit
    assert r.stdout == ("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
                        "<|im_start|>user\nsecond message<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")
    # the checkpoint records no training stage: one warning that it may not be chat-trained
    assert r.stderr.count("may not be chat-trained") == 1 and "--stage sft" in r.stderr


def test_cli_missing_model_one_line_error():
    r = run_cli("--model", "does/not/exist.pt", "--prompt", "x")
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model does/not/exist.pt"), r.stderr


def test_main_num_samples_seed(tiny_ckpt, capsys):
    args = ["--model", str(tiny_ckpt), "--prompt", "Hello", "--num-samples", "2", "--seed", "3",
            "--max-new-tokens", "8", "--device", "cpu"]
    assert generate.main(args) == 0
    a = capsys.readouterr().out
    assert generate.main(args) == 0
    b = capsys.readouterr().out
    assert a == b
    assert a.count("--- sample ") == 2 and "--- sample 2/2 ---\nHello" in a


@pytest.mark.parametrize("args, needle", [
    (["--model", "{ckpt}", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--model", "{ckpt}", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--model", "{ckpt}", "--chat", "--num-samples", "2"], "--num-samples"),
    (["--model", "{ckpt}", "--prompt", "x", "--system", "s"], "--system"),
    (["--model", "{garbage}", "--prompt", "x", "--device", "cpu"], "garbage.pt"),
    (["--model", "{ckpt}", "--prompt", "x", "--device", "tpu9"], "--device 'tpu9'"),
])
def test_main_bad_input_one_line_error(args, needle, tiny_ckpt, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("this is not a checkpoint")
    args = [a.format(ckpt=tiny_ckpt, garbage=garbage) for a in args]
    try:
        rc = generate.main(args)
    except SystemExit as e:  # a flag's value out of range is refused by the parser (exit 2)
        rc = e.code
    assert rc == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], cap.err
    assert cap.out == ""


def test_main_same_greedy_text_from_pt_bin_and_hf_dir(tiny_model, tiny_ckpt, tmp_path, capsys):
    """Every format model.load_model reads works, with the tokenizer taken from the model:
    a lossless fp32 .bin export and an HF directory give the .pt checkpoint's greedy text."""
    import quantize
    from model import save_hf

    bin_path, hf_dir = tmp_path / "tiny-fp32.bin", tmp_path / "hf"
    assert quantize.main(["--model", str(tiny_ckpt), "--output", str(bin_path),
                          "--strategy", "fp32", "--quiet"]) == 0
    save_hf(tiny_model, hf_dir)
    capsys.readouterr()
    outs = []
    for path in (tiny_ckpt, bin_path, hf_dir):
        assert generate.main(["--model", str(path), "--prompt", "Fish 鱼", "--temperature", "0",
                              "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0].startswith("Fish 鱼") and len(outs[0]) > len("Fish 鱼\n")
    assert outs[1] == outs[0] and outs[2] == outs[0]


# ------------------------------------------------------------------------------------------
# shared conventions and the first-day chat fixes (issues 10 and 14)


def test_fit_prompt_is_model_fit_prompt_with_half_the_window():
    from engine import fit_prompt as shared_fit_prompt

    for n_prompt in (1, 10, 63, 64, 65, 100, 200):
        for max_new in (1, 20, 64, 65, 118, 500):
            warnings: list[str] = []
            got = fit_generation_prompt(list(range(n_prompt)), max_new, 128, warn=warnings.append)
            assert got == shared_fit_prompt(list(range(n_prompt)), max_new, 128, min_prompt=64)
            ids, n = got
            assert len(ids) + n <= 128 and len(ids) >= min(n_prompt, 64)  # the reply never pushes it all out
            assert len(warnings) == (len(ids) < n_prompt) + (n < max_new)
    warnings = []
    assert fit_generation_prompt(list(range(200)), 500, 128, warn=warnings.append) == (list(range(136, 200)), 64)
    assert warnings == ["prompt has 200 tokens; keeping the last 64 to fit the 128-token context",
                        "--max-new-tokens 500 does not fit the 128-token context after a 64-token prompt; "
                        "generating at most 64"]


def test_piped_chat_writes_chatml_role_markers(tiny_tokenizer):
    tok = tiny_tokenizer
    reply = "Two lines:\nfour, 四."
    out, err = io.StringIO(), io.StringIO()
    inp = io.StringIO("what is 2+2?\n" + "word " * 100 + "\n/reset\nthanks\n")
    history = chat_loop(FakeModel(tok, max_seq_len=96), inp, out, role_markers=True, max_new_tokens=40,
                        err_stream=err, token_stream=fake_stream([tok.encode(reply) + [tok.im_end_id]]))
    turns = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": reply},
             {"role": "user", "content": ("word " * 100).rstrip("\n")},  # not sent: no assistant turn
             {"role": "user", "content": "thanks"}, {"role": "assistant", "content": reply}]
    from text_tokenizer import render_chatml
    assert out.getvalue() == render_chatml(turns)
    assert "message too long" in err.getvalue() and "conversation reset" in err.getvalue()
    assert history == turns[3:]
    # a script gets each reply back exactly, newlines included
    replies = [b.split("<|im_end|>")[0] for b in out.getvalue().split("<|im_start|>assistant\n")[1:]]
    assert replies == [reply, reply]


def test_enable_line_editing(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("readline") is None:
        pytest.skip("this Python has no readline module")
    assert generate.enable_line_editing() is True and "readline" in sys.modules
    monkeypatch.setitem(sys.modules, "readline", None)  # as on a Python built without it
    assert generate.enable_line_editing() is False


def test_interactive_chat_reads_with_input_after_readline(tiny_tokenizer, monkeypatch, capsys):
    tok = tiny_tokenizer
    calls: list = []
    monkeypatch.setattr(generate, "enable_line_editing", lambda: calls.append("readline") or True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    out, err = io.StringIO(), io.StringIO()
    history = chat_loop(FakeModel(tok), sys.stdin, out, interactive=True, err_stream=err,
                        token_stream=fake_stream([tok.encode("Hi!") + [tok.im_end_id]]))
    assert calls == ["readline"]  # turned on once, before the first input()
    assert capsys.readouterr().out == "you> you> "  # input()'s prompt, once per line read
    assert out.getvalue() == "fish> Hi!\n" and "chatting with" in err.getvalue()
    assert history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi!"}]


def test_training_stage_and_chat_warning(tiny_model, tmp_path):
    from model import load_model, save_checkpoint, save_hf

    paths = {name: tmp_path / f"{name}.pt" for name in ("sft", "pretrain", "args_sft", "none")}
    save_checkpoint(paths["sft"], tiny_model, extra={"stage": "sft", "tokens_seen": 10})
    save_checkpoint(paths["pretrain"], tiny_model, extra={"stage": "pretrain"})
    save_checkpoint(paths["args_sft"], tiny_model, train_args={"stage": "sft"})
    save_checkpoint(paths["none"], tiny_model)
    models = {k: load_model(p) for k, p in paths.items()}
    assert {k: m.stage for k, m in models.items()} == {"sft": "sft", "pretrain": "pretrain", "args_sft": "sft",
                                                       "none": None}
    assert generate.chat_training_warning(models["sft"]) is None
    assert generate.chat_training_warning(models["args_sft"]) is None
    w = generate.chat_training_warning(models["pretrain"])
    assert "may not be chat-trained" in w and "'pretrain'" in w and "--stage sft" in w and "pretrain.pt" in w
    assert "records no training stage" in generate.chat_training_warning(models["none"])
    # an HF export carries the stage (config.json), so a chat-trained export gets no warning
    save_hf(models["sft"], tmp_path / "hf-sft")
    assert load_model(tmp_path / "hf-sft").stage == "sft"
    assert generate.chat_training_warning(load_model(tmp_path / "hf-sft")) is None
    # and so does a quantized .bin
    import quantize
    assert quantize.main(["--model", str(paths["sft"]), "--output", str(tmp_path / "sft.bin"), "--strategy", "int8",
                          "--quiet"]) == 0
    assert load_model(tmp_path / "sft.bin").stage == "sft"


def test_main_chat_warns_only_for_models_that_were_not_chat_trained(tiny_model, tmp_path, monkeypatch, capsys):
    from model import save_checkpoint

    m = crafted_model(tiny_model, tiny_model.tokenizer.im_end_id)
    sft, pre = tmp_path / "sft.pt", tmp_path / "pre.pt"
    save_checkpoint(sft, m, extra={"stage": "sft"})
    save_checkpoint(pre, m, extra={"stage": "pretrain"})
    for path, warned in ((sft, 0), (pre, 1)):
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain\n"))
        assert generate.main(["--model", str(path), "--chat", "--temperature", "0", "--device", "cpu"]) == 0
        cap = capsys.readouterr()
        assert cap.err.count("may not be chat-trained") == warned, cap.err
        assert cap.out == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
                           "<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")


@pytest.mark.parametrize("flag,value", [
    ("--max-new-tokens", "0"), ("--temperature", "-1"), ("--temperature", "nan"), ("--top-k", "-1"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--num-samples", "0"), ("--seed", "-3"), ("--dtype", "int3")])
def test_bad_flag_values_are_refused_by_the_parser(flag, value, capsys):
    assert_parser_refuses(generate.main, ["--prompt", "x", flag, value], flag, capsys)


def test_flag_vocabulary_quiet_and_dtype_spellings(tiny_ckpt, capsys):
    p = generate.build_parser()
    assert [p.parse_args(["--dtype", d]).dtype for d in ("auto", "float32", "bfloat16", "float16", "bf16")] == \
        ["auto", "fp32", "bf16", "fp16", "bf16"]
    assert p.parse_args([]).dtype == "auto" and p.parse_args(["--no-progress"]).quiet is True
    text = p.format_help()
    assert "--quiet" in text and "--no-progress" not in text and "{auto,fp32,fp16,bf16}" in text
    args = ["--model", str(tiny_ckpt), "--prompt", "Hello", "--num-samples", "2", "--seed", "3",
            "--max-new-tokens", "8", "--device", "cpu"]
    assert generate.main(args) == 0
    loud = capsys.readouterr()
    assert generate.main(args + ["--quiet"]) == 0
    quiet = capsys.readouterr()
    assert "tok/s" in loud.err and quiet.err == "" and quiet.out == loud.out


# ----------------------------------------------------------------------------- on a GPU (pytest -m cuda)

@pytest.mark.cuda
def test_cuda_compiled_graph_decode_gives_the_eager_text_on_a_trained_model(gpu_trained, gpu):
    """generate.py decodes through the compiled CUDA-graph step by default on CUDA; on a trained
    checkpoint its greedy text is the eager step's, token for token (fp32)."""
    from conftest import run_script
    ckpt = gpu_trained / "fishai-best.pt"
    common = ["--model", ckpt, "--prompt", "The", "--temperature", 0, "--max-new-tokens", 60, "--device", gpu,
              "--dtype", "fp32"]
    fast, eager = run_script("generate.py", *common), run_script("generate.py", *common, "--no-compile")
    assert fast.returncode == 0 and eager.returncode == 0, fast.stderr[-2000:] + eager.stderr[-2000:]
    assert fast.stdout == eager.stdout and len(fast.stdout) > 20
    # teacher-forced, the two steps give the same logits in bf16 too (scoring.decode_tolerance)
    from model import load_model
    m = load_model(ckpt, device=gpu)
    seq = torch.tensor([m.tokenizer.encode(fast.stdout)[:48]], device=gpu)
    with torch.autocast(torch.device(gpu).type, dtype=torch.bfloat16):
        ok, detail = scoring.check_decode_paths_agree(m, seq, 8, torch.bfloat16)
    assert ok, detail
    assert ("CUDA graph" in detail) == (gpu == "cuda") and "failed" not in detail


@pytest.mark.cuda
def test_cuda_scripted_chat(gpu_trained, gpu):
    from conftest import run_script
    r = run_script("generate.py", "--model", gpu_trained / "fishai-best.pt", "--chat", "--temperature", 0,
                   "--max-new-tokens", 12, "--device", gpu, stdin="hello\nand again\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("<|im_start|>user\n") == 2 and r.stdout.count("<|im_start|>assistant\n") == 2
    assert "may not be chat-trained" in r.stderr and "Traceback" not in r.stderr
