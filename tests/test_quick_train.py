"""quick_train.py: the auto-adjust rules, the offline message, and small end-to-end runs
(tokenizer -> prepare -> train -> test perplexity -> adjust -> report) on real text."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quick_train  # noqa: E402

SHRINK = ["--model-override", "d_model=64", "--model-override", "n_layers=2", "--model-override", "n_heads=4",
          "--model-override", "n_kv_heads=2", "--model-override", "d_ff=192", "--model-override", "max_seq_len=128"]




def small_args(data, out, *extra):
    return ["--config", "tiny", *SHRINK, "--data", str(data), "--output-dir", str(out), "--vocab-size", "300",
            "--max-steps", "12", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2",
            "--eval-interval", "4", "--eval-iters", "2", "--device", "cpu", "--no-progress", "--test-max-kb", "20",
            "--sample-tokens", "8", "--val-fraction", "0.05", *map(str, extra)]


# ----------------------------------------------------------------------------- decisions

BASE = {"max_steps": 100, "lr": 1e-3, "warmup": 10}


def test_decide_undertrained_continues_with_more_steps_and_lower_lr():
    nxt, why = quick_train.decide_next_round({"val_losses": [5.0, 4.5, 4.2], "test_metric": 80.0}, BASE, [])
    assert nxt["max_steps"] == 100 and nxt["lr"] == pytest.approx(5e-4) and nxt["warmup"] == 10
    assert "still falling" in why and "undertrained" in why


def test_decide_overfitting_and_plateau_and_divergence_and_stall():
    nxt, why = quick_train.decide_next_round({"val_losses": [4.0, 3.5, 3.7], "test_metric": 80.0}, BASE, [])
    assert nxt["lr"] == pytest.approx(3e-4) and nxt["max_steps"] == 50 and "rose" in why
    nxt, why = quick_train.decide_next_round({"val_losses": [4.0, 3.5, 3.499], "test_metric": 80.0}, BASE, [])
    assert nxt["lr"] == pytest.approx(3e-4) and nxt["max_steps"] == 100 and "plateaued" in why
    nxt, why = quick_train.decide_next_round({"diverged": True, "test_metric": math.inf}, BASE, [])
    assert nxt["lr"] == pytest.approx(1e-3 / 3) and nxt["warmup"] == 20 and "diverged" in why
    nxt, why = quick_train.decide_next_round({"val_losses": [5.0, 4.0], "test_metric": 79.9}, BASE,
                                             [{"test_metric": 80.0}])
    assert nxt is None and "under 1%" in why


# ----------------------------------------------------------------------------- CLI

def test_default_wikitext_offline_gives_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = quick_train.main(["--config", "tiny", "--output-dir", str(tmp_path / "q"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1  # bad input: EXIT_USAGE
    assert err.startswith("error: WikiText-103") and "--data" in err and "--data python-docs" in err
    assert not (tmp_path / "q" / "report.json").exists()
    assert not (tmp_path / "q").exists()  # a failed run leaves nothing behind, not even an empty --output-dir


def test_non_empty_output_dir_needs_overwrite(tmp_path, capsys, text_file):
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc = quick_train.main(small_args(text_file, out))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--overwrite" in err and (out / "mine.txt").read_text() == "keep me"


def test_end_to_end_two_rounds_with_auto_adjust(tmp_path, text_file, capsys):
    out = tmp_path / "q"
    # an unreachable target forces the auto-adjust path: round 2 continues from round 1's best
    rc = quick_train.main(small_args(text_file, out, "--target-ppl", 1.01, "--max-rounds", 2,
                                     "--json", tmp_path / "r.json"))
    stdout = capsys.readouterr().out
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text()) == rep
    assert len(rep["rounds"]) == 2 and rep["target_met"] is False
    r1, r2 = rep["rounds"]
    assert r1["init_from"] is None and r2["init_from"] == str(out / "round1" / "fishai-best.pt")
    assert r2["settings"]["lr"] < r1["settings"]["lr"]  # every rule lowers the peak LR
    assert rep["decisions"][0].startswith("round 1: test word_ppl") and "> target 1.01" in rep["decisions"][0]
    assert "--max-rounds 2 reached" in rep["decisions"][1]
    assert "[quick_train] decision: round 1" in stdout
    # the loss falls, perplexities are real numbers on held-out text
    assert r1["val_losses"][-1] < r1["val_losses"][0]
    t = rep["test"]
    assert 1 < t["token_ppl"] < 300 and t["word_ppl"] > t["token_ppl"] and 0 < t["bits_per_byte"] < 8
    assert t["tokens"] > 1000 and rep["test_set"].startswith("held-out documents")
    assert rep["tokens_seen"] == r1["tokens"] + r2["tokens"] == 2 * 12 * 4 * 32  # steps x batch x seq-len
    assert rep["vocab_size"] == 320  # trained 300-token tokenizer, rounded up to 64
    # artefacts: best checkpoint, report, samples, loss curve (or the note why not)
    from model import load_checkpoint
    assert load_checkpoint(out / "fishai-best.pt")["step"] >= 4
    md = (out / "report.md").read_text()
    assert "| round | steps |" in md and "## Decisions" in md and "## Samples" in md
    assert len(rep["samples"]) == 3 and all(isinstance(s["completion"], str) for s in rep["samples"])
    if rep["loss_curve"]:
        assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in rep["loss_curve_note"] and rep["loss_curve_note"] in md
    # held-out test documents never reached training: the test docs are absent from train/val
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["train"]["docs"] + meta["val"]["docs"] < len(text_file.read_text().split("\n\n"))


def test_target_met_stops_after_one_round(tmp_path, text_file, capsys):
    out = tmp_path / "q"
    rc = quick_train.main(small_args(text_file, out, "--target-ppl", 1e300, "--max-steps", 4,
                                     "--eval-interval", 4, "--samples", 0))
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["target_met"] is True and len(rep["rounds"]) == 1
    assert "target met" in rep["decisions"][0]
    assert not (out / "round2").exists()


def test_time_budget_cuts_steps_and_caps_the_round(tmp_path, text_file):
    out = tmp_path / "q"
    args = small_args(text_file, out, "--time-budget", 8, "--samples", 1)
    i = args.index("--max-steps")
    del args[i:i + 2]  # the budget only applies when --max-steps is not given
    assert quick_train.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    budget = [d for d in rep["decisions"] if d.startswith("time budget:")]
    assert len(budget) == 1 and "tokens/s measured here" in budget[0]
    r1 = rep["rounds"][0]
    assert 1 <= r1["steps"] <= quick_train.PRESET_DEFAULTS["tiny"]["max_steps"] and r1["time_s"] < 30
    assert rep["total_time_s"] < 60


def test_pick_cpu_threads_keeps_the_faster_setting():
    torch.set_num_threads(2)
    try:
        tps, why = quick_train.pick_cpu_threads(lambda: 1000.0 if torch.get_num_threads() == 1 else 300.0)
        assert tps == 1000.0 and "1 thread ran 1,000 tokens/s vs 300 with 2" in why
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        tps, why = quick_train.pick_cpu_threads(lambda: 1000.0 if torch.get_num_threads() == 2 else 900.0)
        assert tps == 1000.0 and why is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
