"""quick_train.py: the auto-adjust rules, the offline message, and small end-to-end runs
(tokenizer -> prepare -> train -> test perplexity -> adjust -> report) on real text."""
import json
import os
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


def recipe_args(data, out, *extra):
    """small_args without --lr and --warmup: train.py's recipe fills them."""
    args = small_args(data, out, *extra)
    for flag in ("--lr", "--warmup"):
        i = args.index(flag)
        del args[i:i + 2]
    return args


# ----------------------------------------------------------------------------- decisions

BASE = {"max_steps": 100, "lr": 1e-3, "warmup": 10}


def test_decide_undertrained_continues_with_more_steps_and_lower_lr():
    nxt, why = quick_train.decide_next_round({"val_losses": [5.0, 4.5, 4.2], "test_metric": 80.0}, BASE, [])
    assert nxt["max_steps"] == 100 and nxt["lr"] == pytest.approx(5e-4) and nxt["warmup"] == 10
    assert "still falling" in why and "undertrained" in why


WSD = {**BASE, "optimizer": "muon", "schedule": "wsd"}
STABLE = {"stable_checkpoint": "/runs/q/round1/fishai-stable.pt", "stable_step": 80, "end_step": 100,
          "decay_start": 80}


def test_decide_wsd_undertrained_continues_the_stable_phase_from_fishai_stable():
    info = {"val_losses": [5.0, 4.5, 4.2], "test_metric": 80.0, **STABLE}
    nxt, why = quick_train.decide_next_round(info, WSD, [])
    # the same run, longer: max_steps 100 + 100, the LR and warmup untouched (no rewarm)
    assert nxt == {**WSD, "max_steps": 200, "resume": "/runs/q/round1/fishai-stable.pt"}
    assert nxt["lr"] == 1e-3 and nxt["warmup"] == 10
    assert "still falling" in why and "fishai-stable.pt (step 80" in why and "100 -> 200" in why
    assert "no rewarm" in why and "decay moves to the new end" in why
    # a continuation of a continuation goes on from its own stable checkpoint; the other rules
    # start from the best checkpoint and drop the continuation
    nxt2, _ = quick_train.decide_next_round({**info, "stable_checkpoint": "/r2/fishai-stable.pt"}, nxt, [])
    assert nxt2["resume"] == "/r2/fishai-stable.pt" and nxt2["max_steps"] == 400 and nxt2["lr"] == 1e-3
    for vals, word in (([4.0, 3.5, 3.7], "rose"), ([4.0, 3.5, 3.499], "plateaued")):
        nxt3, why = quick_train.decide_next_round({"val_losses": vals, "test_metric": 80.0, **STABLE}, nxt, [])
        assert "resume" not in nxt3 and nxt3["lr"] == pytest.approx(3e-4) and word in why
    nxt3, why = quick_train.decide_next_round({"diverged": True, "test_metric": math.inf, **STABLE}, nxt, [])
    assert "resume" not in nxt3 and nxt3["lr"] == pytest.approx(1e-3 / 3) and "diverged" in why


def test_decide_without_stable_checkpoint_falls_back_to_the_best_checkpoint_and_says_why():
    falling = {"val_losses": [5.0, 4.5, 4.2], "test_metric": 80.0}
    # cut by the time budget before the decay began: no fishai-stable.pt
    info = {**falling, "stable_checkpoint": None, "stopped_by": "max_time", "end_step": 60, "decay_start": 80}
    nxt, why = quick_train.decide_next_round(info, WSD, [])
    assert "resume" not in nxt and nxt["max_steps"] == 100 and nxt["warmup"] == 10
    assert nxt["lr"] == pytest.approx(5e-4)
    assert "no fishai-stable.pt" in why and "stopped it at step 60, before its LR decay began at step 80" in why
    assert "from the best checkpoint" in why and "rewarm" in why
    # --schedule cosine: the old rule even when a stable checkpoint is somehow there
    nxt, why = quick_train.decide_next_round({**falling, **STABLE}, {**WSD, "schedule": "cosine"}, [])
    assert "resume" not in nxt and nxt["lr"] == pytest.approx(5e-4) and "--schedule cosine" in why
    nxt, why = quick_train.decide_next_round({**falling, "stable_checkpoint": None, "decay_start": 2},
                                             {**WSD, "max_steps": 2}, [])
    assert "resume" not in nxt and "a 2-step run has no decay phase" in why


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
    assert rc == 2 and "--overwrite" not in err and (out / "mine.txt").read_text() == "keep me"
    assert err == (f"error: --output-dir {out}: holds files that this command did not write (mine.txt); it replaces "
                   "the folder as a whole, which would delete them: choose a new or empty folder")
    # not even with --overwrite, which replaces only quick_train's own outputs
    (out / "data").mkdir()
    (out / "data" / "raw.txt").write_text("my data")
    rc = quick_train.main(small_args(text_file, out, "--overwrite"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "did not write (data, mine.txt)" in err and (out / "data" / "raw.txt").read_text() == "my data"
    (out / "mine.txt").unlink()  # a data/ of the user's own, where quick_train writes its prepared data: kept
    rc = quick_train.main(small_args(text_file, out, "--overwrite"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds files that this command did not write (data)" in err
    assert (out / "data" / "raw.txt").read_text() == "my data"
    # an output directory that holds the input is refused too
    rc = quick_train.main(small_args(text_file, text_file.parent, "--overwrite"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"contains the input --data {text_file}" in err and text_file.is_file()


def test_end_to_end_two_rounds_with_auto_adjust(tmp_path, text_file, capsys, monkeypatch):
    out = tmp_path / "q"
    plotted = []
    plot = quick_train.train.plot_losses
    monkeypatch.setattr(quick_train.train, "plot_losses",
                        lambda series, path: plotted.append(series) or plot(series, path))
    # an unreachable target forces the auto-adjust path; round 1's val loss is still falling, so
    # round 2 continues the WSD run from round 1's fishai-stable.pt with twice the steps
    rc = quick_train.main(small_args(text_file, out, "--target-ppl", 1.01, "--max-rounds", 2,
                                     "--json", tmp_path / "r.json"))
    stdout = capsys.readouterr().out
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text()) == rep
    assert len(rep["rounds"]) == 2 and rep["target_met"] is False
    r1, r2 = rep["rounds"]
    from model import load_checkpoint
    stable = out / "round1" / "fishai-stable.pt"
    stable_step = load_checkpoint(stable)["step"]
    assert stable_step == r1["stable_step"] == r1["decay_start"] == 10  # 12 steps, the last 20% decay
    assert r1["init_from"] is None and r2["init_from"] is None and r2["resumed_from"] == str(stable)
    # --lr 3e-3 wins over the recipe, and the continuation keeps it: same LR, no rewarm, more steps
    s1, s2 = r1["settings"], r2["settings"]
    assert (s1["optimizer"], s1["schedule"], s1["lr"], s1["max_steps"]) == ("muon", "wsd", 3e-3, 12)
    assert load_checkpoint(out / "round1" / "fishai-best.pt")["train_args"]["lr"] == 3e-3
    assert s2 == {**s1, "max_steps": 24}
    assert "round 1: 12 steps, muon + wsd, peak LR 3.00e-03, warmup 2, from scratch" in stdout
    assert (f"round 2: 24 steps, muon + wsd, peak LR 3.00e-03 (the checkpoint's), warmup 2, continuing {stable}"
            in stdout)
    # round 2's steps start after the stable step: its own metrics, the record and the loss curve agree
    m2 = [json.loads(x) for x in (out / "round2" / "metrics.jsonl").read_text().splitlines()]
    steps2 = [m["step"] for m in m2 if "loss" in m or "val_loss" in m]
    assert steps2[0] > stable_step and steps2[-1] == 24
    assert all(m["lr"] == pytest.approx(3e-3) for m in m2 if "lr" in m and m["step"] <= 19)  # stable phase: peak
    assert (r2["start_step"], r2["end_step"], r2["steps"]) == (stable_step, 24, 24 - stable_step)
    assert r1["step_offset"] == r2["step_offset"] == 0  # the same run: round 2 branches off round 1 at step 10
    curve = plotted[-1][1]  # quick_train's plot over the rounds (train.py plots each run first)
    assert plotted[-1][0]["label"] == "round 1" and curve["label"] == "round 2"
    assert curve["step_offset"] == 0 and min(m["step"] for m in curve["metrics"]) > stable_step
    assert "still falling" in rep["decisions"][0] and "fishai-stable.pt (step 10" in rep["decisions"][0]
    assert "--max-steps 12 -> 24" in rep["decisions"][0] and "no rewarm" in rep["decisions"][0]
    assert rep["decisions"][0].startswith("round 1: test word_ppl") and "> target 1.01" in rep["decisions"][0]
    assert "--max-rounds 2 reached" in rep["decisions"][1]
    assert "[quick_train] decision: round 1" in stdout
    # the loss falls, perplexities are real numbers on held-out text
    assert r1["val_losses"][-1] < r1["val_losses"][0] and r2["best_val_loss"] < r1["best_val_loss"]
    t = rep["test"]
    assert 1 < t["token_ppl"] < 300 and t["word_ppl"] > t["token_ppl"] and 0 < t["bits_per_byte"] < 8
    assert t["tokens"] > 1000 and rep["test_set"].startswith("held-out documents")
    # tokens trained: round 1's 12 steps + round 2's 14 (steps 11-24), x batch x seq-len
    assert r2["tokens"] == 14 * 4 * 32 and rep["tokens_seen"] == r1["tokens"] + r2["tokens"] == (12 + 14) * 4 * 32
    assert rep["vocab_size"] == 320  # trained 300-token tokenizer, rounded up to 64
    # artefacts: best checkpoint, report, samples, loss curve (or the note why not)
    assert load_checkpoint(out / "fishai-best.pt")["step"] > stable_step  # round 2's weights
    md = (out / "report.md").read_text()
    assert "| round | steps | optimizer + schedule |" in md and "## Decisions" in md and "## Samples" in md
    assert "| 1 | 12 of 12 | muon + wsd | 3.00e-03 | 2 |" in md
    assert "| 2 | 14 (steps 11-24 of 24) | muon + wsd, continued | 3.00e-03 | 2 |" in md
    assert len(rep["samples"]) == 3 and all(isinstance(s["completion"], str) for s in rep["samples"])
    if rep["loss_curve"]:
        assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in rep["loss_curve_note"] and rep["loss_curve_note"] in md
    # held-out test documents never reached training: the test docs are absent from train/val
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["train"]["docs"] + meta["val"]["docs"] < len(text_file.read_text().split("\n\n"))


def test_cosine_schedule_keeps_the_init_from_best_rule(tmp_path, text_file):
    out = tmp_path / "q"
    rc = quick_train.main(small_args(text_file, out, "--schedule", "cosine", "--optimizer", "adamw", "--target-ppl",
                                     1.01, "--max-rounds", 2, "--samples", 0))
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    r1, r2 = rep["rounds"]
    assert (r1["settings"]["optimizer"], r1["settings"]["schedule"]) == ("adamw", "cosine")
    assert not (out / "round1" / "fishai-stable.pt").exists() and r1["stable_checkpoint"] is None
    assert "still falling" in rep["decisions"][0] and "--schedule cosine" in rep["decisions"][0]
    assert r2["init_from"] == str(out / "round1" / "fishai-best.pt") and r2["resumed_from"] is None
    assert r2["settings"]["lr"] == pytest.approx(3e-3 * 0.5) and r2["settings"]["warmup"] == 1  # rewarm 12 // 10
    assert (r2["start_step"], r2["step_offset"]) == (0, 12)  # a new run after round 1's 12 steps
    m2 = [json.loads(x) for x in (out / "round2" / "metrics.jsonl").read_text().splitlines()]
    assert min(m["step"] for m in m2) <= 5 and rep["tokens_seen"] == 2 * 12 * 4 * 32


def test_target_met_stops_after_one_round(tmp_path, text_file, capsys):
    out = tmp_path / "q"
    rc = quick_train.main(small_args(text_file, out, "--target-ppl", 1e300, "--max-steps", 4,
                                     "--eval-interval", 4, "--samples", 0))
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["target_met"] is True and len(rep["rounds"]) == 1
    assert "target met" in rep["decisions"][0]
    assert not (out / "round2").exists()


def test_time_budget_cuts_steps_and_caps_the_round(tmp_path, text_file, monkeypatch, capsys):
    """A budget that cannot hold the preset's 500 steps at the measured speed cuts the first round
    to what fits (the speed is pinned here so that the cut is certain: 1,000 tokens/s)."""
    import re
    monkeypatch.setattr(quick_train, "measure_train_speed", lambda *a, **kw: 1000.0)
    out = tmp_path / "q"
    args = small_args(text_file, out, "--time-budget", 8, "--samples", 1)
    i = args.index("--max-steps")
    del args[i:i + 2]  # the budget only applies when --max-steps is not given
    assert quick_train.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    budget = [d for d in rep["decisions"] if d.startswith("time budget:")]
    assert len(budget) == 1 and "at 1,000 tokens/s measured here fit ~" in budget[0]
    left, fit, new = map(float, re.search(r"(\d+) s left .* fit ~(\d+) steps, so --max-steps 500 -> (\d+)",
                                           budget[0]).groups())
    # 85% of the seconds left (printed rounded) at 1,000 tokens/s over 4 x 32 tokens a step
    assert abs(fit - 0.85 * left * 1000 / (4 * 32)) <= 0.85 * 0.5 * 1000 / 128 + 1
    assert new == max(20, fit) < 500 and 1 <= rep["rounds"][0]["steps"] <= new
    assert "the model is undertrained" in capsys.readouterr().out


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


# ----------------------------------------------------------------------------- issue 14

def test_device_cuda_without_cuda_is_refused_before_any_work(tmp_path, capsys, text_file):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "q"
    rc = quick_train.main(small_args(text_file, out, "--device", "cuda"))
    err = capsys.readouterr()
    assert rc == 2 and err.err.strip() == "error: --device cuda: CUDA is not available on this machine; use --device cpu"
    assert err.out == "" and not out.exists()


def test_character_figures_for_text_without_spaces():
    # a scoring.perplexity result for 280 characters of Chinese (tests/test_benchmark.py checks
    # that perplexity() computes these keys): the report shows characters, not words
    t = {"nll": 500.0, "tokens": 200, "words": 1, "chars": 280, "bytes": 840, "bits_per_byte": 0.86,
         "token_ppl": 12.2, "word_ppl": float("inf"), "char_ppl": math.exp(500 / 280), "chars_per_token": 1.4,
         "spaced": False}
    rep = {"config": "tiny", "data": "zh.txt", "date": "d", "device": "cpu", "total_time_s": 1.0, "tokens_seen": 10,
           "params": 1e6, "vocab_size": 512, "tokenizer": "t", "test_set": "s", "test_tokens": 200, "test": t,
           "target_ppl": None, "target_metric": "word_ppl", "target_met": False, "decisions": [], "samples": [],
           "loss_curve": None, "loss_curve_note": "n", "best_checkpoint": "b", "undertrained": None,
           "rounds": [{"round": 1, "steps": 4, "settings": {"max_steps": 4, "lr": 1e-3, "warmup": 1}, "tokens": 10,
                       "time_s": 1.0, "best_val_loss": 2.0, "val_ppl": 7.4, "test": t}]}
    md = quick_train.report_markdown(rep)
    assert "**0.860 bits/byte**" in md and "test char ppl |" in md and "word ppl" not in md.replace("word perplexity", "")
    assert f"| {t['char_ppl']:.2f} |" in md and "1.40 characters per token" in md


def test_undertrained_rule_warns_on_the_console_and_at_the_top_of_the_report(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    job = quick_train.Job(quick_train.build_parser().parse_args([]), None, torch.device("cpu"), 0.0, None)
    job.budget, job.planned_steps = 300, 500
    assert quick_train.undertrained(job, [{"steps": 200}]) is None  # 40% of the planned steps is enough
    msg = quick_train.undertrained(job, [{"steps": 58}, {"steps": 100}])
    assert "158 of the 500 planned steps (32%" in msg and "--time-budget 0" in msg and "OMP_NUM_THREADS=1" in msg
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user already chose the threads: no hint about them
    assert "OMP_NUM_THREADS" not in quick_train.undertrained(job, [{"steps": 58}, {"steps": 100}])
    job.budget = None
    assert quick_train.undertrained(job, [{"steps": 5}]) is None  # without a budget the user chose the steps
    t = {"bits_per_byte": 2.5, "token_ppl": 400.0, "word_ppl": 481.0, "spaced": True}
    rep = {"config": "tiny", "data": "python-docs", "date": "d", "device": "cpu", "total_time_s": 1.0,
           "tokens_seen": 10, "params": 1e6, "vocab_size": 512, "tokenizer": "t", "test_set": "s", "test_tokens": 9,
           "test": t, "target_ppl": None, "target_metric": "word_ppl", "target_met": False, "decisions": [],
           "samples": [{"prompt": "The", "completion": " the the the"}], "loss_curve": None, "loss_curve_note": "n",
           "best_checkpoint": "b", "undertrained": msg, "rounds": []}
    md = quick_train.report_markdown(rep).splitlines()
    assert md[2].startswith("> **Warning: the model is undertrained") and "--time-budget 0" in md[2]
    samples = md.index("## Samples")
    assert md[samples + 2].startswith("The model is undertrained")


def test_test_documents_follow_the_holdout_rule_and_never_reach_the_tokenizer(text_file):
    import data_utils as du
    c = quick_train.Corpus(str(text_file), "text", 0.02, quick_train.TEST_FRACTION, None)
    docs = list(c.documents())
    splits = [du.holdout_split(i, 0.02, quick_train.TEST_FRACTION) for i in range(len(docs))]
    test = [d for d, s in zip(docs, splits) if s == "test"]
    assert 0 < len(test) and list(c.tokenizer_documents()) == [d for d, s in zip(docs, splits) if s != "test"]
    assert c.test_documents(10**9) == test and c.test_documents(1) == test[:1]


def test_failed_rounds_remove_the_run_and_exit_1(tmp_path, capsys, text_file, monkeypatch):
    def diverge(args):
        raise quick_train.train.DivergedError("loss was NaN/inf for 10 consecutive steps")
    monkeypatch.setattr(quick_train.train, "train", diverge)
    out = tmp_path / "q"
    rc = quick_train.main(small_args(text_file, out, "--max-rounds", 1))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["error: no round produced a checkpoint; lower --lr or raise --warmup"]
    assert not out.exists()


def test_ctrl_c_in_a_round_keeps_the_run_and_says_how_to_continue(tmp_path, capsys, text_file, monkeypatch):
    """A real SIGINT at round 1's 5th step: train.py saves the round's state, quick_train keeps the
    run (not removed as a failure), prints the train.py --resume line and exits 130; that line works."""
    import signal
    real_step = quick_train.train.train_step

    def step_then_ctrl_c(run, step, hooks):
        out = real_step(run, step, hooks)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(quick_train.train, "train_step", step_then_ctrl_c)
    out = tmp_path / "q"
    rc = quick_train.main(small_args(text_file, out, "--max-rounds", 2))
    err = capsys.readouterr().err
    latest = out / "round1" / quick_train.train.LATEST_NAME
    assert rc == 130 and latest.exists(), err
    assert torch.load(latest, map_location="cpu", weights_only=False)["step"] == 5
    assert (f"interrupted in round 1: kept {out} with the round's state at step 5 ({latest}); continue that round "
            f"with `python train.py --resume {latest} --output-dir {out / 'round1'}`") in err
    assert not (out / "round2").exists() and "Traceback" not in err
    monkeypatch.setattr(quick_train.train, "train_step", real_step)
    summary = quick_train.train.train(quick_train.train.parse_args(
        ["--resume", str(latest), "--output-dir", str(out / "round1"), "--quiet"]))
    assert summary["steps"] == 12 and summary["interrupted"] is None


def test_bits_per_byte_target_and_new_flag_spellings(tmp_path, text_file):
    p = quick_train.build_parser()
    assert p.parse_args(["--sample-tokens", "5"]).max_new_tokens == 5 and p.parse_args(["--no-progress"]).quiet
    assert p.parse_args(["--force"]).overwrite and p.parse_args(["--target-metric", "char_ppl"]).target_metric
    trainer = quick_train.train
    assert quick_train.OPTIMIZERS == trainer.OPTIMIZERS and quick_train.SCHEDULES == trainer.SCHEDULES
    a = p.parse_args(["--optimizer", "adamw", "--schedule", "cosine", "--lr", "1e-3"])
    first = quick_train.first_settings(a)
    assert (first["optimizer"], first["schedule"], first["lr"]) == ("adamw", "cosine", 1e-3)
    assert quick_train.first_settings(p.parse_args(["--config", "tiny"]))["lr"] is None  # None: train's recipe
    out = tmp_path / "q"
    args = recipe_args(text_file, out, "--target-metric", "bits_per_byte", "--target-ppl", 8, "--max-steps", 4,
                       "--samples", 0, "--json", tmp_path / "r.json")
    assert quick_train.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    # no --lr/--warmup: train.py's recipe for this width (d_model 64) fills them, and the round records it
    cfg = trainer.build_config("tiny", 320, trainer.parse_overrides(SHRINK[1::2]))
    recipe = trainer.recipe_for(cfg)
    settings = rep["rounds"][0]["settings"]
    assert recipe["lr"] == pytest.approx(8e-3 * 2) and settings["lr"] == pytest.approx(recipe["lr"])
    assert (settings["optimizer"], settings["schedule"], settings["warmup"]) == ("muon", "wsd", 1)  # 2% of 4, up
    assert (settings["batch_size"], settings["grad_accum"]) == (4, 1)  # given flags win over the recipe's
    from model import load_checkpoint
    ran = load_checkpoint(out / "round1" / "fishai-best.pt")["train_args"]  # what train.py itself ran with
    assert (ran["lr"], ran["warmup"], ran["optimizer"], ran["schedule"]) == (settings["lr"], 1, "muon", "wsd")
    assert rep["decisions"][0].startswith("round 1: test bits_per_byte") and rep["target_met"] is True
    assert rep["headline_metric"] == "bits_per_byte" and rep["test"]["spaced"] is True
    assert rep["test"]["char_ppl"] > 1 and rep["test"]["chars_per_token"] > 1
    assert rep["data_meta"]["test_docs_left_out"] > 0
    # --json refuses to replace an existing file without --overwrite, before any work
    assert quick_train.main(small_args(text_file, tmp_path / "q2", "--json", tmp_path / "r.json")) == 2
    assert not (tmp_path / "q2").exists()


@pytest.mark.cuda
def test_cuda_quick_train_end_to_end(tmp_path, text_file, gpu):
    """quick_train.py --device cuda as the README runs it: tokenizer -> prepare -> train on the GPU
    -> test bits/byte -> report."""
    from conftest import run_script
    out = tmp_path / "q"
    r = run_script("quick_train.py", *small_args(text_file, out, "--device", gpu, "--json", tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["device"].startswith(gpu) and rep["rounds"][0]["steps"] == 12
    assert 0 < rep["test"]["bits_per_byte"] < 10 and (out / "fishai-best.pt").is_file()
