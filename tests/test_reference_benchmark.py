"""reference_benchmark.py: transformers models scored with benchmark.py's functions, offline handling."""
import json
import math
import shutil

import pytest
import torch

import benchmark as B
import reference_benchmark as R
import scoring  # noqa: E402


def _save_hf(model, tok_dir, out):
    model.save_pretrained(out)
    for f in tok_dir.iterdir():  # the tiny byte-level BPE tokenizer (HF-compatible dir)
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, tiny_tokenizer_dir, tiny_config):
    """Tiny GPT-NeoX, GPT-2 and Llama models built from configs with random weights, saved to disk."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM)
    root = tmp_path_factory.mktemp("hf")
    V = tiny_config.vocab_size
    torch.manual_seed(0)
    models = {
        "neox": GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=96, bos_token_id=0, eos_token_id=0)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=80,
                                           bos_token_id=0, eos_token_id=0)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, tie_word_embeddings=True,
                                              bos_token_id=None, eos_token_id=0)),
    }
    return {k: _save_hf(m.eval(), tiny_tokenizer_dir, root / k) for k, m in models.items()}


@pytest.fixture(scope="module")
def data_flags(shared_data):
    return ["--wikitext2", str(shared_data / "wikitext2" / "test.txt"),
            "--ptb", str(shared_data / "ptb" / "ptb.valid.txt"), "--max-chars", "8000", "--no-progress"]


def test_reference_models_scored_like_benchmark(tmp_path, hf_models, trained_ckpt, data_flags, capsys):
    """The same weights give the same perplexity through benchmark.py (FishAI .pt) and through
    reference_benchmark.py (the transformers export), and every tiny architecture is scored."""
    from model import load_model, save_hf
    export = save_hf(load_model(trained_ckpt), tmp_path / "fishai-hf")
    out = tmp_path / "ref.json"
    models = ",".join([str(hf_models["neox"]), str(hf_models["gpt2"]), str(hf_models["llama"]), str(export),
                       "fishai-test-org/no-such-model"])
    rc = R.main(["--models", models, "--fishai", str(trained_ckpt), "--device", "cpu", *data_flags,
                 "--json", str(out), "--report", str(tmp_path / "ref.md")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(out.read_text())
    m = res["models"]
    # offline / missing hub model: one clear error line, the run went on
    assert "error" in m["fishai-test-org/no-such-model"]
    assert "fishai-test-org/no-such-model" in cap.err and "Traceback" not in cap.err
    from test_scoring import _brute_force_nll
    docs = scoring.load_datasets([("wikitext2", data_flags[1]), ("ptb", data_flags[3])], max_chars=8000)
    for name in ("neox", "gpt2", "llama"):
        r = m[str(hf_models[name])]
        assert r["kind"] == "hf" and set(r["perplexity"]) == {"wikitext2", "ptb"}
        lm = scoring.load_lm(hf_models[name], hf=True)
        for ds, p in r["perplexity"].items():
            # the reference scorer: every token with exactly the context its window gives it, one
            # transformers forward a window; random weights keep it near uniform over the vocabulary
            ids = [lm.encode(d) for d in docs[ds]]
            nll = sum(_brute_force_nll(lm, x, lm.max_seq_len) for x in ids)
            assert p["tokens"] == sum(map(len, ids)) > 0.5 * r["max_seq_len"]
            assert p["token_ppl"] == pytest.approx(math.exp(nll / p["tokens"]), rel=1e-4)
            assert 200 < p["token_ppl"] < 2000
    assert m[str(hf_models["gpt2"])]["max_seq_len"] == 80    # n_positions
    assert m[str(hf_models["neox"])]["max_seq_len"] == 96    # max_position_embeddings
    # FishAI checkpoint (benchmark.py's FishAI path) == its HF export scored by transformers
    ours, theirs = m[str(trained_ckpt)], m[str(export)]
    assert ours["kind"] == "fishai" and theirs["kind"] == "hf"
    for ds in ("wikitext2", "ptb"):
        a, b = ours["perplexity"][ds], theirs["perplexity"][ds]
        assert a["tokens"] == b["tokens"] and a["words"] == b["words"] and a["bytes"] == b["bytes"]
        assert b["token_ppl"] == pytest.approx(a["token_ppl"], rel=1e-3)
        assert b["word_ppl"] == pytest.approx(a["word_ppl"], rel=1e-3)
        assert a["token_ppl"] < 200  # trained: far below the random models
    # ... and equal to benchmark.py full's JSON for the same checkpoint
    full_json = tmp_path / "full.json"
    assert B.main(["full", "--model", str(trained_ckpt), "--device", "cpu", *data_flags, "--no-generation",
                   "--json", str(full_json)]) == 0
    full = json.loads(full_json.read_text())["perplexity"]
    for ds in ("wikitext2", "ptb"):
        assert full[ds]["token_ppl"] == pytest.approx(ours["perplexity"][ds]["token_ppl"], rel=1e-3)
    # published figures are labelled as such, not mixed with measurements
    assert res["published"]["gpt2 (published, GPT-2 paper)"]["word_ppl"] == {"wikitext2": 29.41,
                                                                             "wikitext103": 37.50, "ptb": 65.85}
    assert "published" in cap.out and "37.50" not in json.dumps(m)
    md = (tmp_path / "ref.md").read_text()
    assert "not measured here" in md and "| gpt2 (published, GPT-2 paper) |" in md


def test_llama_dir_same_through_fishai_and_transformers(hf_models, shared_data):
    """A plain tied Llama directory loads either as a FishAI GPT (from_hf) or through transformers;
    both must score it identically."""
    docs = scoring.load_datasets([("ptb", str(shared_data / "ptb" / "ptb.valid.txt"))], max_chars=5000)["ptb"]
    a = scoring.perplexity(scoring.load_lm(hf_models["llama"]), docs, stride=64, progress=False)
    b = scoring.perplexity(scoring.load_lm(hf_models["llama"], hf=True), docs, stride=64, progress=False)
    assert scoring.load_lm(hf_models["llama"]).kind == "fishai"
    assert a["token_ppl"] == pytest.approx(b["token_ppl"], rel=1e-4)


def test_begin_token_is_bos_else_eos(hf_models, tmp_path):
    """Documents start after the tokenizer's BOS when it has one, else after EOS (FishAI: no BOS)."""
    plain = scoring.load_lm(hf_models["gpt2"], hf=True)
    assert plain.tokenizer.bos_token_id is None and plain.begin_id == plain.eos_id == 0
    with_bos = shutil.copytree(hf_models["gpt2"], tmp_path / "gpt2-bos")
    cfg_path = with_bos / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["bos_token"] = "<|im_start|>"
    cfg_path.write_text(json.dumps(cfg))
    lm = scoring.load_lm(with_bos, hf=True)
    assert lm.begin_id == lm.tokenizer.bos_token_id == 1
    # encode never adds special tokens; the begin token is added by the scoring functions only
    assert lm.encode("hello world") == plain.encode("hello world")
    assert lm.encode("hello world")[0] != 1
    r = scoring.loglikelihood(lm, [([], lm.encode("hello"))], progress=False)
    ids = lm.encode("hello")
    logp = torch.log_softmax(lm.logits(torch.tensor([[1] + ids[:-1]]))[0], -1)
    assert r[0][0] == pytest.approx(float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()), rel=1e-5)


def test_no_model_loadable_exits_nonzero(tmp_path, data_flags, capsys):
    rc = R.main(["--models", f"{tmp_path / 'missing-dir'},fishai-test-org/none", *data_flags])
    cap = capsys.readouterr()
    assert rc == 1
    assert cap.err.count("error:") == 2 and "missing-dir" in cap.err


def test_bad_flags_are_one_line_errors(tmp_path, hf_models, capsys):
    for args, needle in [(["--ptb", str(tmp_path / "none.txt")], "none.txt"),
                         (["--data", "justaname"], "NAME=PATH"),
                         (["--models", "", "--data", f"x={hf_models['gpt2'] / 'config.json'}"], "nothing to score")]:
        rc = R.main([*args, "--json", str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and needle in err
    assert not (tmp_path / "r.json").exists()


def test_llama_the_fishai_gpt_cannot_represent_falls_back_to_transformers(tmp_path, tiny_tokenizer_dir,
                                                                          tiny_config):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=tiny_config.vocab_size, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, tie_word_embeddings=False))
    path = _save_hf(untied.eval(), tiny_tokenizer_dir, tmp_path / "untied")
    lm = scoring.load_lm(path)
    assert lm.kind == "hf" and lm.max_seq_len == 64
    text = "The city of Paris is the capital of France. " * 10
    r = scoring.perplexity(lm, [text], progress=False)
    from test_scoring import _brute_force_nll
    ids = lm.encode(text)
    assert r["tokens"] == len(ids) > 64 and 100 < r["token_ppl"] < 3000  # random weights: about uniform
    assert r["token_ppl"] == pytest.approx(math.exp(_brute_force_nll(lm, ids, 64) / len(ids)), rel=1e-4)


def test_table_puts_bits_per_byte_first_and_char_ppl_for_chinese(tmp_path, trained_ckpt, capsys):
    """Issue 14: bits/byte is the first figure of each dataset; Chinese gets per-character perplexity."""
    zh, en = tmp_path / "zh.txt", tmp_path / "en.txt"
    # the opening of the Daodejing (public domain): no spaces between words
    zh.write_text("道可道，非常道；名可名，非常名。無名天地之始；有名萬物之母。\n故常無欲，以觀其妙；常有欲，以觀其徼。"
                  "此兩者，同出而異名，同謂之玄。玄之又玄，衆妙之門。\n" * 3, encoding="utf-8")
    en.write_text("The river runs through the old town, past the market and the church, to the sea.\n" * 6,
                  encoding="utf-8")
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = R.main(["--models", "", "--fishai", str(trained_ckpt), "--data", f"daodejing={zh}", "--data", f"river={en}",
                 "--device", "cpu", "--quiet", "--no-published", "--json", str(out), "--report", str(md)])
    assert rc == 0
    r = json.loads(out.read_text())["models"][str(trained_ckpt)]["perplexity"]
    assert r["daodejing"]["spaced"] is False and r["river"]["spaced"] is True
    table = capsys.readouterr().out.split("\n\n")[-1]
    head, row = table.splitlines()[:2]
    assert head.split()[3:7] == ["daodejing", "bpb", "PPL", "river"]
    cells = row.split()[3:]
    assert cells[:3] == [f"{r['daodejing']['bits_per_byte']:.4f}", scoring.fmt_ppl(r["daodejing"]["char_ppl"]), "char"]
    assert cells[3:6] == [f"{r['river']['bits_per_byte']:.4f}", scoring.fmt_ppl(r["river"]["word_ppl"]), "word"]
    report = md.read_text()
    assert "| daodejing bits/byte | daodejing PPL | daodejing token PPL |" in report
    assert f"| {r['daodejing']['bits_per_byte']:.4f} | {scoring.fmt_ppl(r['daodejing']['char_ppl'])} char |" in report
