"""Tests for evaluate.py: scoring rules, loaders on the real files, the sandbox, the CLI end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate as ev
import scoring  # noqa: E402
from conftest import assert_parser_refuses  # noqa: E402


# ------------------------------------------------------------------------------------------
# helpers

class FakeLM:
    """A byte-level LM with uniform logits: lets prompt construction be tested exactly, fast. It is its
    own tokenizer (byte 0 is EOS, the one special token)."""

    def __init__(self, max_seq_len=100_000):
        self.name, self.device, self.max_seq_len, self.kind = "fake", "cpu", max_seq_len, "fishai"
        self.eos_id = self.begin_id = 0
        self.vocab_size = 256
        self.tokenizer = self

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special=False):
        return bytes(i for i in ids if not (skip_special and i == 0)).decode("utf-8", errors="replace")

    def logits(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size)


def run_cli(capsys, *argv):
    rc = ev.main([*map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def mmlu_dir(tmp_path, test_rows, dev_rows=None, subject="anatomy"):
    for split, rows in (("test", test_rows), ("dev", dev_rows)):
        if rows is None:
            continue
        d = tmp_path / "mmlu" / split
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{subject}_{split}.csv").write_text(rows, encoding="utf-8")
    return tmp_path


# ------------------------------------------------------------------------------------------
# scoring rules

def test_loglikelihood_matches_hand_computed(tiny_ckpt):
    """The core's log-likelihood of a continuation equals a manual log_softmax over the model's logits."""
    from model import load_model
    lm = scoring.load_lm(tiny_ckpt, device="cpu")
    scorer = ev.Scorer(lm, progress=False)
    context, conts = "The capital of France is", [" Paris", " a city in Europe"]
    reqs = [scorer.encode_pair(context, c) for c in conts]
    got = scoring.loglikelihood(lm, reqs, batch_size=2, progress=False)
    model = load_model(tiny_ckpt)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits, _ = model(ids[:, :-1])
        logp = F.log_softmax(logits[0].double(), dim=-1)
        positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        manual = sum(float(logp[p, t]) for p, t in zip(positions, cont))
        assert ll == pytest.approx(manual, abs=1e-4)
        assert greedy == all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))
    # the multiple-choice rule picks the argmax of exactly these numbers
    item = ev.Scorer(lm, progress=False).multiple_choice(
        [{"context": context, "continuations": conts, "gold": 0}], "t")[0]
    assert item["loglikelihoods"] == pytest.approx([g[0] for g in got])
    assert item["pred"] == int(np.argmax([g[0] for g in got]))
    norm = [g[0] / len(c) for g, c in zip(got, conts)]
    assert item["acc_norm"] == float(int(np.argmax(norm)) == 0)


def test_long_continuation_is_scored_in_windows(tiny_ckpt):
    """A continuation longer than the window: the pieces add up to a manual sliding-window score."""
    lm = scoring.load_lm(tiny_ckpt, device="cpu")
    s = ev.Scorer(lm, progress=False)
    ctx, cont = s.encode_pair("Once upon a time", " there was a story" * 40)
    assert len(cont) > lm.max_seq_len
    parts = s.split_request(ctx, cont)
    assert sum(len(c) for _, c in parts) == len(cont) and all(len(c) <= lm.max_seq_len // 2 for _, c in parts)
    assert all(a + c == (ctx + cont)[:len(a) + len(c)] for a, c in parts)
    item = s.multiple_choice([{"context": "Once upon a time", "continuations": [" there was a story" * 40, " x"],
                               "gold": 1}], "t")[0]
    got = scoring.loglikelihood(lm, parts, progress=False)
    assert item["loglikelihoods"][0] == pytest.approx(sum(g[0] for g in got), abs=1e-6)


def test_encode_pair_moves_trailing_space_to_continuation():
    s = ev.Scorer(FakeLM(), progress=False)
    ctx, cont = s.encode_pair("Answer: ", "A")
    assert bytes(ctx) == b"Answer:" and bytes(cont) == b" A"


@pytest.mark.parametrize("text,strict,flexible", [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", "18", "18"),
    ("#### 1,234\n\nQuestion: next", "1,234", "1,234"),
    ("The answer is $1,000.", "[invalid]", "$1,000."),
    ("first 3 then 4 and finally -12 apples", "[invalid]", "-12"),
    ("#### -7.5 and then 99", "-7.5", "99"),
    ("no numbers here", "[invalid]", "[invalid]"),
    ("just 5", "[invalid]", "5"),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert ev.extract_strict(text) == strict
    assert ev.extract_flexible(text) == flexible


def test_gsm8k_exact_match_normalisation():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 1,018"
    assert ev.gsm8k_exact_match("1,018", ref) == 1.0
    assert ev.gsm8k_exact_match("$1018.", ref) == 1.0
    assert ev.gsm8k_exact_match("1018.0", ref) == 0.0      # exact match, as the harness scores it
    assert ev.gsm8k_exact_match("[invalid]", ref) == 0.0
    assert ev.normalize_answer(ref) == "1018"


def test_truncate_at_stop():
    # evaluate cuts answers with the one stop-string cut, engine.cut_at_stop
    from engine import cut_at_stop
    assert cut_at_stop("  return x\n\ndef f():", ev.HUMANEVAL_STOP) == "  return x\n"
    assert cut_at_stop(" 42.\n\nQuestion: x", ev.GSM8K_STOP) == " 42.\n\n"
    assert cut_at_stop("no stop", ev.HUMANEVAL_STOP) == "no stop"


def test_pass_at_k_equals_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        c = int(rng.integers(0, n + 1))
        k = int(rng.integers(1, n + 1))
        closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert ev.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-9)
    assert ev.pass_at_k(10, 0, 5) == 0.0
    assert ev.pass_at_k(10, 10, 1) == 1.0
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        ev.pass_at_k(5, 2, 6)


def test_hellaswag_preprocess():
    # exactly the harness's steps: strip, " [title]" -> ". ", drop [..], "  " -> " " (a leading space can remain)
    assert ev.hellaswag_preprocess(" [header] How to cook [title] Boil water. [step] Add  salt ") == \
        " How to cook. Boil water. Add salt"
    doc = ev.hellaswag_doc({"activity_label": "Pole vault", "ctx_a": "A man runs.", "ctx_b": "he",
                            "endings": ["jumps.", "a [b] c", "x", "y"], "label": "2"})
    assert doc == {"query": "Pole vault: A man runs. He", "choices": ["jumps.", "a c", "x", "y"], "gold": 2}


def test_mmlu_prompt_is_the_harness_template(shared_data):
    data = ev.load_mmlu(shared_data)
    sub = {"anatomy": data["anatomy"]}
    items_log = ev.run_mmlu_like(ev.Scorer(FakeLM(), progress=False), "mmlu", sub, 5, 1)[1]
    prompt = items_log[0]["prompt"]
    test0, dev = data["anatomy"][0][0], data["anatomy"][1]
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    blocks = prompt.split("\n\n")[1:]
    assert len(blocks) == 6
    for block, d in zip(blocks, dev):
        assert block == (f"{d['question'].strip()}\nA. {d['choices'][0]}\nB. {d['choices'][1]}\n"
                         f"C. {d['choices'][2]}\nD. {d['choices'][3]}\nAnswer: {'ABCD'[d['answer']]}")
    assert blocks[-1].endswith("\nAnswer:") and blocks[-1].startswith(test0["question"].strip())
    assert items_log[0]["choices"] == [" A", " B", " C", " D"]


def test_ceval_prompt_and_fewer_shots_when_context_is_short(shared_data):
    data = ev.load_ceval(shared_data)
    sub = {"computer_network": data["computer_network"]}
    res, log = ev.run_mmlu_like(ev.Scorer(FakeLM(), progress=False), "ceval", sub, 5, 2)
    p = log[0]["prompt"]
    # ceval-valid_computer_network.yaml's description (no "考试")
    assert p.startswith("以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n")
    assert p.count("\n答案：") == 6 and p.endswith("\n答案：") and res["fewshot_reduced"] == 0
    assert res["categories"] == {"STEM": {"acc": res["acc"], "acc_stderr": res["acc_stderr"],
                                          "acc_norm": res["acc_norm"], "acc_norm_stderr": res["acc_norm_stderr"],
                                          "n": 2}}
    # a 300-byte window: by default (the harness's rule) all 5 shots stay and the oldest tokens are cut
    res1, log1 = ev.run_mmlu_like(ev.Scorer(FakeLM(300), progress=False), "ceval", sub, 5, 2)
    assert [r["prompt"] for r in log1] == [r["prompt"] for r in log]
    assert res1["truncated"] == 2 and res1["fewshot_reduced"] == 0 and res1["num_fewshot"] == 5
    # --drop-shots: fewer shots, and with 0 shots still too long -> counted as truncated
    res2, log2 = ev.run_mmlu_like(ev.Scorer(FakeLM(300), progress=False), "ceval", sub, 5, 2, drop_shots=True)
    assert res2["fewshot_reduced"] == 2 and log2[0]["prompt"].count("\n答案：") < 6
    assert res2["num_fewshot"] == min(r["num_fewshot"] for r in log2) < 5
    assert all(len(r["prompt"].encode()) + 1 <= 300 or r["truncated"] for r in log2)


# ------------------------------------------------------------------------------------------
# loaders on the real files

def test_loaders_on_real_files(shared_data):
    mmlu = ev.load_mmlu(shared_data)
    assert {s: len(t) for s, (t, _) in mmlu.items()} == {
        "abstract_algebra": 100, "anatomy": 135, "college_biology": 144, "computer_security": 100,
        "high_school_government_and_politics": 193, "management": 103, "marketing": 234, "philosophy": 311}
    assert all(len(d) == 5 for _, d in mmlu.values())
    assert all(len(doc["choices"]) == 4 and 0 <= doc["answer"] <= 3 for t, _ in mmlu.values() for doc in t)
    assert set(mmlu) <= set(ev.MMLU_SUBJECTS) and len(ev.MMLU_SUBJECTS) == 57

    ceval = ev.load_ceval(shared_data)
    assert set(ceval) == set(ev.CEVAL_SUBJECTS) and len(ceval) == 52
    assert sum(len(v) for v, _ in ceval.values()) == 1346 and sum(len(d) for _, d in ceval.values()) == 260
    assert ceval["computer_network"][0][0]["question"].startswith("使用位填充方法")
    assert ceval["computer_network"][0][0]["answer"] == 2
    cats = {c for _, c in ev.CEVAL_SUBJECTS.values()}
    assert cats == {"STEM", "Social Science", "Humanities", "Other"}

    hs = ev.load_hellaswag(shared_data)
    assert len(hs) == 1000 and {r["label"] for r in hs} == {0, 1, 2, 3}

    gsm = ev.load_gsm8k(shared_data)
    assert len(gsm) == 1319
    refs = [ev.normalize_answer(r["answer"]) for r in gsm]
    assert refs[0] == "18" and all(ev.extract_strict(r["answer"]) != ev.INVALID for r in gsm)
    assert all(re_ok for re_ok in (x.lstrip("-").isdigit() for x in refs))

    he = ev.load_humaneval(shared_data)
    assert len(he) == 164 and he[0]["task_id"] == "HumanEval/0" and he[-1]["task_id"] == "HumanEval/163"


def test_builtin_gsm8k_shots_are_consistent(shared_data):
    """The built-in exemplars are well formed, arithmetically right and not from the test set."""
    test_questions = {r["question"] for r in ev.load_gsm8k(shared_data)}
    for q, a in ev.GSM8K_FEWSHOT:
        assert q not in test_questions
        for expr, val in __import__("re").findall(r"<<([^=]+)=([^>]+)>>", a):
            assert eval(expr) == pytest.approx(float(val))  # noqa: S307 - our own constant strings
        assert ev.extract_strict(a) != ev.INVALID
    assert len(ev.gsm8k_shots(None, 8)) == 8


# ------------------------------------------------------------------------------------------
# bad input

def test_bad_files_name_the_file_and_expected_columns(tmp_path):
    bad = mmlu_dir(tmp_path / "a", "q,a,b,c,D\n")
    with pytest.raises(ev.EvalError, match=r"anatomy_test\.csv.*5 columns.*question,A,B,C,D,answer"):
        ev.load_mmlu(bad, need_dev=False)
    bad = mmlu_dir(tmp_path / "b", "q,a,b,c,d,E\n")
    with pytest.raises(ev.EvalError, match=r"anatomy_test\.csv.*'E' is not one of A, B, C, D"):
        ev.load_mmlu(bad, need_dev=False)
    ok = mmlu_dir(tmp_path / "c", "q,a,b,c,d,A\n")
    with pytest.raises(ev.EvalError, match=r"missing split: .*mmlu/dev"):
        ev.load_mmlu(ok)
    assert ev.load_mmlu(ok, need_dev=False)["anatomy"][0][0]["answer"] == 0

    d = tmp_path / "d" / "ceval" / "val"
    d.mkdir(parents=True)
    (d / "law_val.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(ev.EvalError, match=r"law_val\.csv: missing column\(s\) answer.*id,question,A,B,C,D,answer"):
        ev.load_ceval(tmp_path / "d", need_dev=False)

    h = tmp_path / "e" / "hellaswag"
    h.mkdir(parents=True)
    (h / "hellaswag_val.jsonl").write_text(json.dumps({"ctx_a": "x", "ctx_b": "y", "label": 1,
                                                       "activity_label": "z"}) + "\n")
    with pytest.raises(ev.EvalError, match=r"hellaswag_val\.jsonl:1: missing field\(s\) endings"):
        ev.load_hellaswag(tmp_path / "e")
    (h / "hellaswag_val.jsonl").write_text("{not json\n")
    with pytest.raises(ev.common.FishAIError, match=r"hellaswag_val\.jsonl:1: not valid JSON.*one JSON object per line"):
        ev.load_hellaswag(tmp_path / "e")
    with pytest.raises(ev.EvalError, match=r"missing split.*hellaswag_train"):
        ev.load_hellaswag(tmp_path / "e", split="train")


def test_hub_offline_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ev.EvalError, match=r"could not load HF dataset openai/gsm8k.*--data-dir"):
        ev.load_gsm8k(None)


def test_cli_bad_input_messages(capsys, tmp_path, shared_data):
    rc, _, err = run_cli(capsys, "--model", "x.pt", "--benchmark", "mmlu,squad")
    assert rc == 2 and "unknown benchmark 'squad'" in err and "mmlu, ceval" in err
    rc, _, err = run_cli(capsys, "--model", "x.pt", "--benchmark", "all")
    assert rc == 2 and "--allow-code-execution" in err
    rc, _, err = run_cli(capsys, "--samples", "s.jsonl", "--benchmark", "mmlu")
    assert rc == 2 and "--benchmark humaneval" in err
    rc, _, err = run_cli(capsys, "--model", tmp_path / "nope.pt", "--benchmark", "mmlu", "--data-dir", shared_data)
    assert rc == 2 and "nope.pt" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # a numeric flag is checked by the parser
        run_cli(capsys, "--model", "x.pt", "--benchmark", "mmlu", "--limit", "0")
    assert e.value.code == 2 and "argument --limit: must be >= 1" in capsys.readouterr().err
    rc, _, err = run_cli(capsys, "--model", "x.pt", "--benchmark", "humaneval", "--allow-code-execution",
                         "--num-samples", "5")
    assert rc == 2 and "--temperature" in err
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    out_json = tmp_path / "r.json"
    rc, _, err = run_cli(capsys, "--samples", samples, "--benchmark", "humaneval", "--data-dir", shared_data,
                         "--allow-code-execution", "--json", out_json)
    assert rc == 2 and "s.jsonl:1: unknown task_id 'HumanEval/999'" in err and not out_json.exists()


# ------------------------------------------------------------------------------------------
# HumanEval execution

def test_sandbox_limits_and_isolation(monkeypatch):
    monkeypatch.setenv("FISHAI_TEST_SECRET", "hunter2")
    progs = [
        "import os\nassert 'FISHAI_TEST_SECRET' not in os.environ\nassert os.getcwd() != %r\n" % os.getcwd(),
        "while True:\n    pass\n",
        "x = bytearray(2 * 1024 ** 3)\n",
        "import os\nos.system('true')\n",
        "raise SystemExit(0)\n",
        "assert 1 == 2, 'boom'\n",
    ]
    res = ev.execute_programs(progs, timeout=2.0, memory_mb=512, workers=3, progress=False)
    assert res[0] == "passed"
    assert res[1] == "timed out" or "signal" in res[1]
    assert res[2].startswith("failed") and "MemoryError" in res[2]
    assert res[3].startswith("failed") and "NoneType" in res[3]
    assert res[4] == "failed: SystemExit: 0"   # exiting early is not passing (as in openai/human-eval)
    assert res[5] == "failed: AssertionError: boom"


def test_humaneval_samples_canonical_and_empty(capsys, tmp_path, shared_data):
    problems = ev.load_humaneval(shared_data)
    canon, empty = tmp_path / "canon.jsonl", tmp_path / "empty.jsonl"
    canon.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                             for p in problems))
    empty.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": ""}) + "\n" for p in problems))
    for path, expected in ((canon, 1.0), (empty, 0.0)):
        out = tmp_path / f"{path.stem}.json"
        rc, stdout, err = run_cli(capsys, "--samples", path, "--benchmark", "humaneval", "--data-dir", shared_data,
                                  "--allow-code-execution", "--json", out, "--exec-workers", "4", "--exec-timeout", "30")
        assert rc == 0, err
        r = json.loads(out.read_text())["results"]["humaneval"]
        assert r["pass@1"] == expected and r["n"] == 164
    # several samples per task: pass@k from the unbiased estimator
    half = tmp_path / "mixed.jsonl"
    lines = []
    for p in problems[:4]:
        lines += [{"task_id": p["task_id"], "completion": p["canonical_solution"]}] * 3
        lines += [{"task_id": p["task_id"], "completion": "    return None\n"}] * 7
    half.write_text("".join(json.dumps(x) + "\n" for x in lines))
    metrics, log = ev.score_humaneval_samples(problems[:4], ev.read_samples(half, problems[:4]), progress=False)
    assert metrics["n"] == 4 and metrics["num_samples"] == 10
    assert metrics["pass@1"] == pytest.approx(0.3) and metrics["pass@10"] == 1.0
    assert sum(x["passed"] for x in log) == 12


# ------------------------------------------------------------------------------------------
# with a model

def test_random_model_is_at_chance(tiny_ckpt, shared_data, tmp_path, capsys):
    """A random tiny model scores at chance (25% for 4 options), within a loose bound, and every
    answer is the argmax of that model's own log-likelihoods of the choices (recomputed here from
    the model's logits), so a scorer that ignored the model could not pass."""
    out, log = tmp_path / "chance.json", tmp_path / "log.jsonl"
    rc, stdout, err = run_cli(capsys, "--model", tiny_ckpt, "--benchmark", "mmlu", "--data-dir", shared_data,
                              "--limit", "15", "--device", "cpu", "--json", out, "--log-samples", log)
    assert rc == 0, err
    res = json.loads(out.read_text())["results"]["mmlu"]
    assert res["n"] == 120 and 0.1 <= res["acc"] <= 0.42
    assert sum(s["n"] for s in res["subjects"].values()) == 120
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    lm = scoring.load_lm(tiny_ckpt, device="cpu")
    scorer = ev.Scorer(lm, progress=False)
    for row in rows[:12]:
        reqs = [scorer.encode_pair(row["prompt"], c) for c in row["choices"]]
        ll = [x for x, _ in scoring.loglikelihood(lm, reqs, progress=False)]
        assert ll == pytest.approx(row["loglikelihoods"], abs=1e-4)
        assert row["acc"] == float(int(np.argmax(ll)) == row["target"])
    assert res["acc"] == pytest.approx(np.mean([r["acc"] for r in rows]))
    rc, _, err = run_cli(capsys, "--model", tiny_ckpt, "--benchmark", "hellaswag", "--data-dir", shared_data,
                         "--limit", "120", "--device", "cpu", "--json", out, "--overwrite", "--log-samples", log)
    assert rc == 0, err
    res = json.loads(out.read_text())["results"]["hellaswag"]
    assert res["n"] == 120 and 0.1 <= res["acc"] <= 0.42 and 0.1 <= res["acc_norm"] <= 0.42
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert res["acc"] == pytest.approx(np.mean([float(np.argmax(r["loglikelihoods"]) == r["target"]) for r in rows]))


def test_all_benchmarks_end_to_end(trained_ckpt, shared_data, tmp_path, capsys):
    out, log = tmp_path / "all.json", tmp_path / "samples.jsonl"
    rc, stdout, err = run_cli(capsys, "--model", trained_ckpt, "--benchmark", "all", "--data-dir", shared_data,
                              "--limit", "2", "--allow-code-execution", "--max-gen-toks", "24", "--device", "cpu",
                              "--json", out, "--log-samples", log)
    assert rc == 0, err
    res = json.loads(out.read_text())["results"]
    assert set(res) == set(ev.BENCHMARKS)
    assert res["mmlu"]["n"] == 16 and set(res["mmlu"]["subjects"]) == set(ev.load_mmlu(shared_data))
    assert res["ceval"]["n"] == 104 and set(res["ceval"]["categories"]) == {"STEM", "Social Science",
                                                                              "Humanities", "Other"}
    assert res["hellaswag"]["n"] == 2 and {"acc", "acc_norm"} <= set(res["hellaswag"])
    assert res["gsm8k"]["n"] == 2 and res["gsm8k"]["fewshot_source"] == "built-in"
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(res["gsm8k"])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    # every metric is the mean of its per-document values in the log (what the model answered)
    for task, metric in (("mmlu", "acc"), ("ceval", "acc"), ("hellaswag", "acc"), ("hellaswag", "acc_norm")):
        assert res[task][metric] == pytest.approx(np.mean([r[metric] for r in by_task[task]])), (task, metric)
    assert res["humaneval"]["n"] == 2
    assert res["humaneval"]["pass@1"] == np.mean([r["result"] == "passed" for r in by_task["humaneval"]])
    assert res["gsm8k"]["exact_match,strict-match"] == np.mean([float(r["strict"] == r["target"].split("#### ")[-1])
                                                                for r in by_task["gsm8k"]])
    # the harness's shot defaults: MMLU 0-shot, GSM8K 5-shot. The 128-token tiny model cannot hold 5-shot
    # prompts: as in the harness they keep their newest tokens (no shot is dropped without --drop-shots),
    # and it says so
    assert res["mmlu"]["num_fewshot"] == 0 and res["gsm8k"]["num_fewshot"] == 5
    assert res["gsm8k"]["truncated"] == 2 and res["gsm8k"]["fewshot_reduced"] == 0
    assert "gsm8k: 2 of 2 prompts did not fit the model's 128-token context and lost their oldest tokens" in err
    assert {t: len(v) for t, v in by_task.items()} == {"mmlu": 16, "ceval": 104, "hellaswag": 2,
                                                       "gsm8k": 2, "humaneval": 2}
    g = by_task["gsm8k"][0]
    assert g["prompt"].endswith("\nAnswer:") and "Question:" not in g["response"]
    assert by_task["humaneval"][0]["result"] in ("passed", "timed out") or \
        by_task["humaneval"][0]["result"].startswith("failed")
    assert "| mmlu | acc |" in stdout


def test_hf_model_is_scored_by_the_same_code(tiny_model, tiny_ckpt, shared_data, tmp_path, capsys):
    """--hf (transformers LlamaForCausalLM) and --model (FishAI) give the same numbers for the same weights."""
    from model import save_hf
    hf_dir = tmp_path / "hf"
    save_hf(tiny_model, hf_dir, tokenizer=tiny_model.tokenizer)
    logs = []
    for flag, spec in (("--hf", hf_dir), ("--model", tiny_ckpt)):
        log = tmp_path / f"{flag[2:]}.jsonl"
        rc, _, err = run_cli(capsys, flag, spec, "--benchmark", "mmlu,gsm8k", "--data-dir", shared_data,
                             "--limit", "1", "--max-gen-toks", "8", "--device", "cpu", "--log-samples", log)
        assert rc == 0, err
        logs.append([json.loads(line) for line in log.read_text().splitlines()])
    for a, b in zip(*logs):
        if a["task"] == "mmlu":
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3)
        else:
            assert a["response"] == b["response"]


# ------------------------------------------------------------------------------------------
# the CLI conventions shared by every script (issue 14)

def humaneval_dir(tmp_path):
    """A one-problem HumanEval copy and a samples file that passes it: --samples runs in a second."""
    d = tmp_path / "data" / "humaneval"
    d.mkdir(parents=True)
    problem = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
               "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    (d / "HumanEval.jsonl").write_text(json.dumps(problem) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "T/0", "completion": "    return 1\n"}) + "\n")
    return tmp_path / "data", samples


def test_flag_vocabulary_and_hidden_aliases():
    p = ev.build_parser()
    a = p.parse_args(["--benchmark", "gsm8k", "--max-gen-toks", "24", "--no-progress", "--force", "--dtype", "bfloat16"])
    assert (a.max_new_tokens, a.quiet, a.overwrite, a.dtype) == (24, True, True, "bf16")
    a = p.parse_args(["--benchmark", "gsm8k", "--max-new-tokens", "7", "--quiet", "--overwrite"])
    assert (a.max_new_tokens, a.quiet, a.overwrite, a.dtype, a.device) == (7, True, True, "auto", "auto")
    text = p.format_help()
    assert "--max-new-tokens" in text and "--quiet" in text and "--overwrite" in text and "auto" in text
    assert not any(old in text for old in ("--max-gen-toks", "--no-progress", "--force"))


@pytest.mark.parametrize("flag,value", [
    ("--num-fewshot", "-1"), ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--max-gen-toks", "-3"),
    ("--num-samples", "0"), ("--temperature", "-0.5"), ("--exec-timeout", "0"), ("--exec-memory-mb", "8"),
    ("--exec-workers", "0"), ("--seed", "-1"), ("--limit", "x"), ("--dtype", "int3")])
def test_bad_flag_values_are_refused_by_the_parser(flag, value, capsys):
    assert_parser_refuses(ev.main, ["--benchmark", "mmlu", flag, value], flag, capsys)


def test_json_and_log_samples_are_not_overwritten_without_overwrite(capsys, tmp_path):
    data, samples = humaneval_dir(tmp_path)
    out, log = tmp_path / "r.json", tmp_path / "log.jsonl"
    common = ["--samples", samples, "--benchmark", "humaneval", "--data-dir", data, "--allow-code-execution"]
    for target, flag in ((out, "--json"), (log, "--log-samples")):
        target.write_text('{"keep": "me"}\n')
        rc, stdout, err = run_cli(capsys, *common, flag, target)
        # refused before any work: nothing scored (no table), the old file untouched
        assert rc == 2 and stdout == "" and target.read_text() == '{"keep": "me"}\n'
        assert err.strip() == f"error: {flag} {target}: file exists; pass --overwrite to replace it, or another {flag}"
    notes = tmp_path / "notes.txt"  # not a results file: never replaced, not even with --overwrite
    notes.write_text("my notes")
    rc, stdout, err = run_cli(capsys, *common, "--json", notes, "--overwrite")
    assert rc == 2 and "is a text file, not a JSON file" in err and notes.read_text() == "my notes"
    rc, stdout, err = run_cli(capsys, *common, "--json", out, "--log-samples", log, "--overwrite")
    assert rc == 0, err
    assert json.loads(out.read_text())["results"]["humaneval"]["pass@1"] == 1.0
    assert json.loads(log.read_text())["passed"] is True and "| humaneval | pass@1 | 1.0000 |" in stdout
    rc, _, err = run_cli(capsys, *common, "--json", out, "--log-samples", out, "--overwrite")
    assert rc == 2 and "give each output its own path" in err and json.loads(out.read_text())["results"]


def test_missing_input_files_exit_2(capsys, tmp_path):
    data, samples = humaneval_dir(tmp_path)
    he = ["--benchmark", "humaneval", "--allow-code-execution"]
    no_pt, no_jsonl, no_dir = tmp_path / "no.pt", tmp_path / "no.jsonl", tmp_path / "nodir"
    for argv, message in (
            (["--model", no_pt, "--benchmark", "mmlu"], f"--model {no_pt}: no such file"),
            (["--samples", no_jsonl, "--data-dir", data, *he], f"--samples {no_jsonl}: no such file"),
            (["--samples", samples, "--data-dir", no_dir, *he], f"--data-dir {no_dir}: no such directory"),
            (["--samples", samples, "--data-dir", tmp_path, *he], "missing file: ")):
        rc, stdout, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("error: " + message), err


class GenLM(FakeLM):
    """FakeLM with a generate_ids() that records what it was asked and answers with a fixed text."""

    def __init__(self, max_seq_len):
        super().__init__(max_seq_len)
        self.calls = []

    def generate_ids(self, ids, max_new_tokens, temperature=0.0, stop=None, seed=None):
        self.calls.append((list(ids), max_new_tokens))
        return self.encode(" 42.\n\nQuestion: next one"), False


def test_generate_keeps_the_newest_prompt_tokens_and_cuts_at_stop():
    lm = GenLM(64)
    s = ev.Scorer(lm, progress=False)
    prompt = "x" * 50 + "0123456789"
    out, truncated = s.generate(prompt, 16, ev.GSM8K_STOP)
    # lm-evaluation-harness: context[-(max_length - max_gen_toks):], then cut at the first stop string
    assert out == " 42.\n\n" and truncated and lm.calls[-1] == (list(prompt.encode())[-48:], 16)
    out, truncated = s.generate("short", 16, ev.GSM8K_STOP)
    assert not truncated and lm.calls[-1] == (list(b"short"), 16)


class SpecialLM(GenLM):
    """GenLM whose answer holds a special token (byte 0) and that records the stop strings it got."""

    def generate_ids(self, ids, max_new_tokens, temperature=0.0, stop=None, seed=None):
        self.stops = stop
        return [*b"12", 0, *b" 3\n\nQuestion: x"], False


def test_generation_skips_special_tokens_and_stops_at_the_eos_text():
    # lm-eval's HF model: tok_decode(skip_special_tokens=True), and the EOS token's text joins `until`
    lm = SpecialLM(64)
    out, truncated = ev.Scorer(lm, progress=False).generate("q", 8, ev.GSM8K_STOP)
    assert out == "12 3\n\n" and not truncated
    assert lm.stops == ["Question:", "</s>", "<|im_end|>", "\x00"]


def test_max_new_tokens_defaults_and_cap(capsys):
    args = ev.build_parser().parse_args(["--benchmark", "humaneval"])
    assert ev.max_new_tokens_for("humaneval", args, 4096) == 1024 and ev.max_new_tokens_for("gsm8k", args, 4096) == 256
    # the harness refuses max_gen_toks >= the context; here it becomes half the context, with a warning
    assert ev.max_new_tokens_for("gsm8k", args, 128) == 64
    assert "gsm8k: --max-new-tokens 256 leaves no room for a prompt" in capsys.readouterr().err
    args = ev.build_parser().parse_args(["--benchmark", "gsm8k", "--max-new-tokens", "100"])
    assert ev.max_new_tokens_for("gsm8k", args, 128) == 100  # the harness runs this: 28 prompt tokens


def test_exact_match_is_the_harness_metric():
    ref = "So she has 5 * 3 = <<5*3=15>>15.\n#### 1,015"
    preds = ["1,015", "1015", "$1015.", "1015 ", " 1015", "1015.0", "[invalid]", "1,0,1,5"]
    ours = [ev.gsm8k_exact_match(p, ref) for p in preds]
    assert ours == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # no whitespace stripping, as in the harness
    metrics = pytest.importorskip("lm_eval.api.metrics", reason="lm-eval is not installed")
    theirs = [metrics.exact_match_hf_evaluate([p], [ref], regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"],
                                              ignore_case=True)["exact_match"] for p in preds]
    assert ours == theirs


def test_shot_sampler_is_the_harness_sampler():
    """sample_shots draws what lm-eval's default ContextSampler draws, call after call from one seed,
    with and without an eval doc to leave out (and its resampling when copies of it were drawn)."""
    import random
    samplers = pytest.importorskip("lm_eval.api.samplers", reason="lm-eval is not installed")
    for pool, n in (([{"i": i} for i in range(40)], 5), ([{"i": 1}] * 4 + [{"i": 0}, {"i": 2}], 2)):
        theirs = samplers.ContextSampler(pool, rnd=None).set_rnd(1234)
        rnd = random.Random(1234)
        for doc in [None, {"i": 1}, {"i": 3}, None, {"i": 1}, {"i": 99}] * 3:
            assert ev.sample_shots(rnd, pool, n, eval_doc=doc) == theirs.sample(n, eval_doc=doc)
    assert ev.sample_shots(random.Random(0), pool, 0) == []


def test_one_forward_pass_per_question_equals_the_per_choice_scores(tiny_ckpt, shared_data):
    """MMLU's " A".." D" are one token each: one forward pass per question gives the log-likelihoods of
    one request per choice (5-shot: every prompt cut to the 128-token window; 0-shot: some cut, others
    shorter, in padded batches)."""
    s = ev.Scorer(scoring.load_lm(tiny_ckpt, device="cpu"), batch_size=3, progress=False)
    forward_inputs = []
    one_pass = s.next_token_logprobs
    s.next_token_logprobs = lambda contexts: forward_inputs.extend(contexts) or one_pass(contexts)
    data = ev.load_mmlu(shared_data, subjects=["anatomy", "marketing"])
    for k, n_truncated in ((5, 8), (0, 5)):
        forward_inputs.clear()
        log = ev.run_mmlu_like(s, "mmlu", data, k, 4)[1]
        assert len(forward_inputs) == len(log) == 8 and sum(r["truncated"] for r in log) == n_truncated
        per_choice = s._per_choice_loglikelihoods([[s.encode_pair(r["prompt"], c) for c in r["choices"]]
                                                   for r in log], "mmlu")
        for r, ll in zip(log, per_choice):
            assert r["loglikelihoods"] == pytest.approx(ll, abs=1e-5) and r["pred"] == int(np.argmax(ll))


def test_subjects_flag(capsys, tmp_path, tiny_ckpt, shared_data):
    assert ev.parse_subjects("anatomy, college_physics,computer_network", ["mmlu", "ceval", "gsm8k"]) == \
        {"mmlu": ["anatomy", "college_physics"], "ceval": ["college_physics", "computer_network"]}
    assert ev.parse_subjects(None, ["mmlu", "gsm8k"]) == {"mmlu": None}
    assert list(ev.load_mmlu(shared_data, subjects=["marketing", "anatomy"])) == ["anatomy", "marketing"]
    assert list(ev.load_ceval(shared_data, need_dev=False, subjects=["law"])) == ["law"]
    for argv, message in (
            (["--benchmark", "mmlu", "--subjects", "anatomy,astrology"],
             "--subjects: unknown subject 'astrology' for mmlu; valid subjects: abstract_algebra, anatomy, "),
            (["--benchmark", "ceval", "--subjects", "anatomy"], "--subjects: unknown subject 'anatomy' for ceval"),
            (["--benchmark", "mmlu,ceval", "--subjects", "anatomy"], "--subjects names no ceval subject"),
            (["--benchmark", "gsm8k", "--subjects", "anatomy"], "--subjects selects MMLU / C-Eval subjects; add mmlu"),
            (["--benchmark", "mmlu", "--subjects", "astronomy", "--data-dir", shared_data],
             f"--subjects astronomy: no {shared_data}/mmlu/test/astronomy_test.csv; this --data-dir has "
             f"abstract_algebra, anatomy,")):
        rc, stdout, err = run_cli(capsys, "--model", tiny_ckpt, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("error: " + message), err


def test_drop_shots_is_opt_in_and_reported(tiny_ckpt, shared_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    common = ["--model", tiny_ckpt, "--benchmark", "mmlu", "--subjects", "anatomy", "--limit", "2",
              "--num-fewshot", "5", "--data-dir", shared_data, "--device", "cpu", "--json", out, "--overwrite"]
    rc, _, err = run_cli(capsys, *common, "--drop-shots")
    assert rc == 0, err
    r = json.loads(out.read_text())
    res = r["results"]["mmlu"]
    assert r["config"]["drop_shots"] is True and res["fewshot_reduced"] == 2 and res["num_fewshot"] < 5
    assert "mmlu: 2 of 2 prompts got fewer than 5 shots" in err
    rc, _, err = run_cli(capsys, *common)
    res = json.loads(out.read_text())["results"]["mmlu"]
    assert rc == 0 and res["fewshot_reduced"] == 0 and res["num_fewshot"] == 5 and res["truncated"] == 2


def test_device_and_dtype_go_through_model_resolvers(monkeypatch):
    seen = {}

    def fake_load_lm(spec, device, dtype, hf, dequantize):
        seen.update(spec=spec, device=device, dtype=dtype, hf=hf, dequantize=dequantize)
        return FakeLM(256)
    monkeypatch.setattr(scoring, "load_lm", fake_load_lm)
    for name, want in (("auto", torch.float32), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        args = ev.build_parser().parse_args(["--benchmark", "mmlu", "--hf", "org/name", "--dtype", name,
                                          "--device", "cpu"])
        assert ev.load_scorer(args).ctx_len == 256
        assert seen == {"spec": "org/name", "device": "cpu", "dtype": want, "hf": True, "dequantize": False}
    args = ev.build_parser().parse_args(["--benchmark", "mmlu", "--model", "m.bin", "--dequantize"])
    ev.load_scorer(args)
    assert seen["dequantize"] is True and seen["spec"] == "m.bin"  # a quantized .bin on plain float weights

    def failing_load_lm(*a, **kw):
        raise scoring.ScoringError("cannot load 'org/name': offline\nsecond line")
    monkeypatch.setattr(scoring, "load_lm", failing_load_lm)
    with pytest.raises(ev.EvalError, match=r"^cannot load 'org/name': offline$"):
        ev.load_scorer(args)


# ------------------------------------------------------------------------------------------
# against the real lm-evaluation-harness: the same data, the same trained weights (its HF export)

PEER_LIMIT, PEER_MAX_NEW = 3, 24
PEER_MMLU = ["abstract_algebra", "anatomy", "college_biology", "computer_security",
             "high_school_government_and_politics", "management", "marketing", "philosophy"]
PEER_CEVAL = ["computer_network", "marxism", "law", "accountant"]  # one per C-Eval category

# HF `evaluate`'s code_eval metric, which the harness's humaneval/utils.py loads from the hub at import
# (impossible offline; and this repo's evaluate.py would shadow the package). The stand-in runs the
# same program, candidate + "\n" + test, with code_eval's 3 s timeout and its pass@k estimate.
CODE_EVAL_STANDIN = '''
import subprocess, sys
import numpy as np


class CodeEval:
    def compute(self, references, predictions, k=(1, 10, 100), timeout=3.0):
        passed = []
        for test, candidates in zip(references, predictions):
            ok = []
            for c in candidates:
                try:
                    ok.append(subprocess.run([sys.executable, "-c", c + "\\n" + test], capture_output=True,
                                             timeout=timeout).returncode == 0)
                except subprocess.TimeoutExpired:
                    ok.append(False)
            passed.append(ok)
        n, c = np.array([len(p) for p in passed]), np.array([sum(p) for p in passed])
        est = lambda n, c, k: 1.0 if n - c < k else 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
        return {f"pass@{j}": float(np.mean([est(a, b, j) for a, b in zip(n, c)])) for j in k if (n >= j).all()}, passed


def load(name, **kwargs):
    assert name == "code_eval", name
    return CodeEval()
'''

HARNESS_RUN = '''
import json, sys
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["standin"])
import lm_eval
from lm_eval.tasks import TaskManager
out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={cfg['hf']},dtype=float32", device="cpu",
                              tasks=cfg["tasks"], task_manager=TaskManager(include_path=cfg["include"],
                              include_defaults=False), batch_size=1, limit=cfg["limit"], log_samples=True,
                              gen_kwargs={"max_gen_toks": cfg["max_new"]}, confirm_run_unsafe_code=True)
json.dump({"results": out["results"], "samples": out["samples"]}, open(cfg["out"], "w"), default=str)
'''


def _csv_rows(path):
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _peer_task_yamls(root, shared, harness_tasks):
    """Our task yamls: each includes the harness's own task file and only points its dataset at local
    json files (dataset_path: json), written here from ../shared/data in the hub datasets' fields."""
    tasks, j = root / "tasks", root / "json"
    tasks.mkdir()

    def task(name, include, files, extra=""):
        data_files = "".join(f"\n    {split}: {path}" for split, path in files.items())
        (tasks / f"{name}.yaml").write_text(f"include: {include}\ntask: {name}\ntag: []\ndataset_path: json\n"
                                            f"dataset_name: null\ndataset_kwargs:\n  data_files:{data_files}\n{extra}")

    def group(name, children, metrics):
        agg = "".join(f"  - metric: {m}\n    weight_by_size: true\n" for m in metrics)
        (tasks / f"{name}.yaml").write_text(f"group: {name}\ntask: {json.dumps(children)}\n"
                                            f"aggregate_metric_list:\n{agg}")

    for s in PEER_MMLU:
        files = {}
        for split in ("test", "dev"):
            rows = [{"question": r[0], "subject": s, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in _csv_rows(shared / "mmlu" / split / f"{s}_{split}.csv")]
            files[split] = _write_jsonl(j / f"mmlu_{s}_{split}.jsonl", rows)
        task(f"peer_mmlu_{s}", harness_tasks / "mmlu" / "default" / f"mmlu_{s}.yaml", files, "num_fewshot: 5\n")
    cats = {}
    for s in PEER_MMLU:
        cats.setdefault(ev.MMLU_SUBJECTS[s], []).append(f"peer_mmlu_{s}")
    for c, names in cats.items():
        group(f"peer_mmlu_{c}", names, ["acc"])
    group("peer_mmlu", [f"peer_mmlu_{c}" for c in cats], ["acc"])
    for s in PEER_CEVAL:
        files = {}
        for split in ("val", "dev"):
            header, *rows = _csv_rows(shared / "ceval" / split / f"{s}_{split}.csv")
            rows = [{"explanation": "", **dict(zip(header, r))} for r in rows]  # the hub's val has the column too
            files[split] = _write_jsonl(j / f"ceval_{s}_{split}.jsonl", rows)
        task(f"peer_ceval_{s}", harness_tasks / "ceval" / f"ceval-valid_{s}.yaml", files, "num_fewshot: 5\n")
    group("peer_ceval", [f"peer_ceval_{s}" for s in PEER_CEVAL], ["acc", "acc_norm"])
    hs = shared / "hellaswag" / "hellaswag_val_subset1000.jsonl"
    hs_train = _write_jsonl(root / "data" / "hellaswag" / "hellaswag_train.jsonl",
                            [json.loads(x) for x in hs.read_text().splitlines()[500:]])
    for name, extra in (("peer_hellaswag", ""), ("peer_hellaswag_2shot", "num_fewshot: 2\n")):
        task(name, harness_tasks / "hellaswag" / "hellaswag.yaml", {"train": hs_train, "validation": hs}, extra)
    gsm = shared / "gsm8k" / "test.jsonl"
    gsm_train = _write_jsonl(root / "data" / "gsm8k" / "train.jsonl",
                             [json.loads(x) for x in gsm.read_text().splitlines()[100:]])
    task("peer_gsm8k", harness_tasks / "gsm8k" / "gsm8k.yaml", {"train": gsm_train, "test": gsm})
    task("peer_humaneval", harness_tasks / "humaneval" / "humaneval.yaml",
         {"test": shared / "humaneval" / "HumanEval.jsonl"})
    return tasks


def _our_data_dir(root, shared):
    """evaluate.py's --data-dir: the shared files, plus the same train splits the harness got."""
    d = root / "data"
    for bench in ("mmlu", "ceval", "humaneval"):
        (d / bench).symlink_to(shared / bench)
    (d / "hellaswag" / "hellaswag_val.jsonl").symlink_to(shared / "hellaswag" / "hellaswag_val_subset1000.jsonl")
    (d / "gsm8k" / "test.jsonl").symlink_to(shared / "gsm8k" / "test.jsonl")
    return d


@pytest.fixture(scope="module")
def peer_runs(trained_ckpt, shared_data, tmp_path_factory):
    """The harness (lm_eval.simple_evaluate, in a subprocess) and evaluate.py on the same five benchmarks,
    the same documents and the trained tiny model: 128-token context, so the 5-shot prompts do not fit."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    if lm_eval.__version__ != "0.4.13":
        pytest.skip(f"the rules were checked against lm-eval 0.4.13; {lm_eval.__version__} is installed")
    pytest.importorskip("accelerate", reason="lm-eval's HF model needs accelerate (pip install 'lm-eval[hf]==0.4.13')")
    import subprocess
    import sys
    from pathlib import Path
    from model import load_model, save_hf
    root = tmp_path_factory.mktemp("peer")
    hf = save_hf(load_model(trained_ckpt), root / "hf")
    include = _peer_task_yamls(root, shared_data, Path(lm_eval.__file__).parent / "tasks")
    data = _our_data_dir(root, shared_data)
    (root / "standin").mkdir()
    (root / "standin" / "evaluate.py").write_text(CODE_EVAL_STANDIN)
    cfg = {"standin": str(root / "standin"), "hf": str(hf), "include": str(include), "limit": PEER_LIMIT,
           "max_new": PEER_MAX_NEW, "out": str(root / "harness.json"),
           "tasks": ["peer_mmlu", "peer_ceval", "peer_hellaswag", "peer_hellaswag_2shot", "peer_gsm8k",
                     "peer_humaneval"]}
    env = {**os.environ, "HF_HOME": str(root / "hf_home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_ALLOW_CODE_EVAL": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", HARNESS_RUN, json.dumps(cfg)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    harness = json.loads((root / "harness.json").read_text())
    ours = {}
    common = ["--model", trained_ckpt, "--data-dir", data, "--limit", PEER_LIMIT, "--device", "cpu"]
    for name, argv in (("mc", ["--benchmark", "mmlu,ceval", "--subjects", ",".join(PEER_MMLU + PEER_CEVAL),
                               "--num-fewshot", 5]),
                       ("main", ["--benchmark", "hellaswag,gsm8k,humaneval", "--max-new-tokens", PEER_MAX_NEW,
                                 "--allow-code-execution"]),
                       ("hellaswag_2shot", ["--benchmark", "hellaswag", "--num-fewshot", 2])):
        out, log = root / f"{name}.json", root / f"{name}.jsonl"
        rc = ev.main([str(a) for a in [*common, *argv, "--json", out, "--log-samples", log, "--quiet"]])
        assert rc == 0
        ours[name] = (json.loads(out.read_text())["results"],
                      [json.loads(line) for line in log.read_text().splitlines()])
    return harness, ours


def _peer_samples(harness, task, ours, bench):
    """(harness sample, our log row) pairs, document by document."""
    theirs = sorted(harness["samples"][task], key=lambda r: r["doc_id"])
    mine = [r for r in ours if r["task"] == bench]
    assert len(theirs) == len(mine) == PEER_LIMIT
    return list(zip(theirs, mine))


def _same_metrics(theirs: dict, mine: dict, names):
    """The harness's results[task] ("acc,none", "acc_stderr,none", "exact_match,strict-match", ...) vs ours
    ("acc", "acc_stderr", "exact_match,strict-match", ...): equal values and standard errors."""
    for name in names:
        metric, filt = name.split(",")
        key, se_key = (metric, f"{metric}_stderr") if filt == "none" else (name, f"{metric}_stderr,{filt}")
        assert mine[key] == pytest.approx(theirs[name], abs=1e-9), name
        their_se = theirs[f"{metric}_stderr,{filt}"]
        assert mine[se_key] is None if their_se == "N/A" else mine[se_key] == pytest.approx(their_se, abs=1e-9), name


def test_peer_harness_multiple_choice(peer_runs):
    """MMLU and C-Eval 5-shot on a 128-token model (every prompt is longer than the context), HellaSwag
    0- and 2-shot: the harness's prompts, log-likelihoods and metrics, per document and per group."""
    harness, ours = peer_runs
    h = harness["results"]
    res, log = ours["mc"]
    assert res["mmlu"]["truncated"] == res["mmlu"]["n"] == 24 and res["mmlu"]["num_fewshot"] == 5
    for bench, subjects, metrics in (("mmlu", PEER_MMLU, ["acc"]), ("ceval", PEER_CEVAL, ["acc", "acc_norm"])):
        _same_metrics(h[f"peer_{bench}"], res[bench], [f"{m},none" for m in metrics])
        for s in subjects:
            _same_metrics(h[f"peer_{bench}_{s}"], res[bench]["subjects"][s], [f"{m},none" for m in metrics])
            for theirs, mine in _peer_samples(harness, f"peer_{bench}_{s}", [r for r in log if r.get("subject") == s],
                                              bench):
                assert [a for a in theirs["arguments"]] == [[mine["prompt"], c] for c in mine["choices"]]
                assert mine["prompt"].count("\nAnswer:" if bench == "mmlu" else "\n答案：") == 6  # 5 shots
                assert [r[0][0] for r in theirs["resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
                assert [theirs[m] for m in metrics] == [mine[m] for m in metrics]
    for c in ("stem", "humanities", "social_sciences", "other"):
        _same_metrics(h[f"peer_mmlu_{c}"], res["mmlu"]["categories"][c], ["acc,none"])
    for task, run in (("peer_hellaswag", "main"), ("peer_hellaswag_2shot", "hellaswag_2shot")):
        res, log = ours[run]
        _same_metrics(h[task], res["hellaswag"], ["acc,none", "acc_norm,none"])
        for theirs, mine in _peer_samples(harness, task, log, "hellaswag"):
            assert [a for a in theirs["arguments"]] == [[mine["prompt"], c] for c in mine["choices"]]
            assert [r[0][0] for r in theirs["resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
            assert (theirs["acc"], theirs["acc_norm"]) == (mine["acc"], mine["acc_norm"])
    assert ours["hellaswag_2shot"][0]["hellaswag"]["num_fewshot"] == 2


def test_peer_harness_generation(peer_runs):
    """GSM8K 5-shot (shots from the seeded sampler, prompts cut to fit 128 - 24 tokens) and HumanEval:
    the harness's prompts, generated text (its stop sequences), extracted answers and metrics."""
    harness, ours = peer_runs
    res, log = ours["main"]
    h = harness["results"]
    _same_metrics(h["peer_gsm8k"], res["gsm8k"], ["exact_match,strict-match", "exact_match,flexible-extract"])
    assert res["gsm8k"]["truncated"] == 3 and res["gsm8k"]["fewshot_source"] == "train split"
    by_filter = {}
    for r in harness["samples"]["peer_gsm8k"]:
        by_filter.setdefault(r["filter"], {})[r["doc_id"]] = r
    for i, mine in enumerate(r for r in log if r["task"] == "gsm8k"):
        theirs = by_filter["strict-match"][i]
        assert theirs["arguments"][0][0] == mine["prompt"] and theirs["resps"][0][0] == mine["response"]
        assert theirs["filtered_resps"][0] == mine["strict"]
        assert by_filter["flexible-extract"][i]["filtered_resps"][0] == mine["flexible"]
    assert res["humaneval"]["pass@1"] == h["peer_humaneval"]["pass@1,create_test"]
    for theirs, mine in _peer_samples(harness, "peer_humaneval", log, "humaneval"):
        assert theirs["arguments"][0][0] == mine["prompt"]
        assert theirs["resps"][0][0] == mine["completion"]
        assert theirs["filtered_resps"][0] == [mine["prompt"] + mine["completion"]]  # build_predictions


@pytest.mark.cuda
def test_cuda_scores_equal_the_cpu_scores(gpu_trained, gpu, shared_data, tmp_path):
    """evaluate.py on the GPU (fp32) gives the CPU's per-document log-likelihoods and accuracy."""
    from conftest import run_script
    ckpt = gpu_trained / "fishai-best.pt"
    runs = {}
    for device in (gpu, "cpu"):
        log, out = tmp_path / f"{device}.jsonl", tmp_path / f"{device}.json"
        r = run_script("evaluate.py", "--model", ckpt, "--benchmark", "hellaswag", "--data-dir", shared_data,
                       "--limit", 40, "--device", device, "--dtype", "fp32", "--json", out, "--log-samples", log,
                       "--overwrite", "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[device] = (json.loads(out.read_text())["results"]["hellaswag"],
                        [json.loads(line)["loglikelihoods"] for line in log.read_text().splitlines()])
    (res_g, ll_g), (res_c, ll_c) = runs[gpu], runs["cpu"]
    assert res_g["n"] == res_c["n"] == 40 and res_g["acc"] == res_c["acc"] and res_g["acc_norm"] == res_c["acc_norm"]
    assert max(abs(a - b) for g, c in zip(ll_g, ll_c) for a, b in zip(g, c)) < 1e-3
