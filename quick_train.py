"""
Train + benchmark in one command: tokenizer (if none given) -> prepare -> train -> test perplexity
(benchmark.py) -> auto-adjust and continue while a target is missed -> report.

Usage (copy-paste):

  # first run, no download, no GPU: Python's bundled docs, ~5 minutes on 2 CPU cores
  python quick_train.py --config tiny --data python-docs

  # the seed's command: FishAI-Small on WikiText-103 (HF wikitext-103-raw-v1), target word ppl <= 56
  python quick_train.py --config small --max-steps 5000 --device cuda

  # your own text, an existing tokenizer, a bits/byte target and up to 3 rounds
  python quick_train.py --config small --data corpus/ --tokenizer tokenizer/ --target-ppl 1.2 \\
      --target-metric bits_per_byte --max-rounds 3

Test documents: the default --data (WikiText-103) is scored on its own test split, --test-data on
what it names. Otherwise the test documents come from --data by the project's one hold-out rule
(data_utils.holdout_split, val fraction --val-fraction, test fraction 0.05) over the one document
stream that the tokenizer and prepare read too: the tokenizer trains on the train and val documents
only, prepare leaves the test documents out of train.bin/val.bin, and the first --test-max-kb of
them are the test set.

Metrics: the headline is bits per byte (comparable across tokenizers and languages). Text with
spaces between words also gets word perplexity (as lm-evaluation-harness reports it); text without
them (Chinese, Japanese) gets perplexity per character and characters per token instead.

Recipe: the optimizer, LR schedule, peak LR and warmup are train.py's recipe for the model
(train.py --help, RECIPE_RULE: Muon + warmup-stable-decay, LR by width, warmup 2% of the steps);
--optimizer, --schedule, --lr and --warmup override it. When a round misses the target, a rule picks
the next one and says why (report.md, "Decisions"). With WSD, an undertrained round (val loss still
falling) is continued from its fishai-stable.pt, saved where its LR decay began: train.py --resume
with twice the --max-steps, so the stable phase goes on at the same LR and the decay moves to the
new end (exactly a longer WSD run). The other rules, and --schedule cosine, start the next round
from the best checkpoint with a new LR and a rewarm.

Too few steps: when --time-budget leaves fewer than 40% of the planned steps (a model that mostly
writes "the the the"), the console and the top of report.md say so, with what to do.

Outputs in --output-dir (default runs/quick): tokenizer/, data/ (train.bin/val.bin), round1/ ...
(checkpoints, fishai-stable.pt with WSD, and metrics.jsonl of each round), fishai-best.pt (the best
round's best weights), report.md, report.json and loss_curve.png (when matplotlib is installed). A
run that fails or is interrupted removes what it wrote.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
import data_utils
import optim
from model import GPT, ModelConfig, count_params, load_checkpoint, load_model
import readers
import scoring
import text_tokenizer
import tokenizer_train
import train

DEFAULT_DATA = "hf:wikitext:wikitext-103-raw-v1"  # train split; the test split is the benchmark
DEFAULT_TARGET_PPL = 56.0  # the seed's WikiText-103 goal (word-level perplexity)
TEST_FRACTION = 0.05  # share of --data documents held out as test documents (holdout_split)
UNDERTRAINED_SHARE = 0.4  # fewer trained steps than this share of the planned ones: say it is undertrained
TARGET_METRICS = ("word_ppl", "token_ppl", "bits_per_byte", "char_ppl")
MIN_VOCAB = 256 + len(text_tokenizer.SPECIAL_TOKENS)  # every byte + the special tokens (tokenizer_train.MIN_VOCAB)

# Per-preset defaults. The optimisation recipe (optimizer, schedule, peak LR, warmup = 2% of the
# steps) is train.py's for every preset (train.apply_recipe, RECIPE_RULE): quick_train passes None
# and train fills it in. `tiny` keeps its own batch, sequence length and eval settings, sized so
# `--data python-docs` finishes in about 5 minutes on a 2-core CPU (measured, docs/RESULTS.md);
# the others take the recipe's batch too (None here = train.py's recipe).
PRESET_DEFAULTS = {
    "tiny": dict(time_budget=300, max_steps=500, batch_size=8, grad_accum=1, seq_len=256,
                 eval_interval=100, eval_iters=8, vocab_size=4096),
    "small": dict(max_steps=5000, seq_len=512, eval_interval=250, eval_iters=50, vocab_size=32000),
    "medium": dict(max_steps=10000, seq_len=1024, eval_interval=500, eval_iters=50, vocab_size=32000),
    "large": dict(max_steps=20000, seq_len=1024, eval_interval=500, eval_iters=50, vocab_size=32000),
}
# What one round passes to train.make_args; None = train.py's recipe fills it.
SETTINGS = ("max_steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup", "eval_interval", "eval_iters",
            "optimizer", "schedule")
OPTIMIZERS = ("muon", "adamw")  # train.OPTIMIZERS / train.SCHEDULES (train imports torch: not imported yet here)
SCHEDULES = ("wsd", "cosine")

SAMPLE_PROMPTS = {
    "python-docs": ["The list type", "Return a new", "This module provides"],
    None: ["The history of the city", "In 1998, the", "The first"],
}


class QuickTrainError(common.FishAIError):
    """Bad input; main() prints it as one line and exits with EXIT_USAGE (2)."""


class RoundInterrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped a training round after it saved its state: the run directory is
    kept, and quick_train_command says how to continue the round."""

    def __init__(self, round_no: int, round_dir: Path, step: int, signal_name: str):
        super().__init__(f"{signal_name} during round {round_no}")
        self.round_no, self.round_dir, self.step = round_no, round_dir, step


class QuickTrainFailed(QuickTrainError, common.RunFailed):
    """The job ran but produced no usable model: exit EXIT_FAILED (1)."""


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(prog="quick_train.py", description=(
        "Tokenizer + data + training + perplexity benchmark in one command, with auto-adjust.\n"
        "Test documents of --data never reach the tokenizer or the training (data_utils.holdout_split)."))
    p.add_argument("--config", default="small", choices=list(PRESET_DEFAULTS), help="model preset")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="training text: file/dir/glob (txt, jsonl, parquet), hf:NAME[:CONFIG[:SPLIT]] or "
                        "python-docs (Python's bundled documentation: no download)")
    readers.add_text_format_flags(p)
    p.add_argument("--test-data", default=None,
                   help="benchmark texts: wikitext103[:PATH], wikitext2[:PATH], ptb[:PATH] or a text source; "
                        f"default: WikiText-103 test for the default --data, else {TEST_FRACTION * 100:g}%% of the "
                        "--data documents held out by the hold-out rule (never trained on)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir; trained on --data when omitted")
    p.add_argument("--vocab-size", type=common.int_flag(MIN_VOCAB), default=None,
                   help="vocab of the trained tokenizer (default: the preset's)")
    p.add_argument("--max-data-mb", type=common.float_flag(0, lo_open=True), default=None,
                   help="use at most this many MB of --data (all of it by default)")
    p.add_argument("--val-fraction", type=common.float_flag(0, 0.5, lo_open=True), default=0.02,
                   help="share of documents held out for validation")
    p.add_argument("--output-dir", default="runs/quick", help="where the run's files go")
    common.add_overwrite_flag(p, "the run in a non-empty --output-dir, and an existing --json file")
    _add_training_flags(p.add_argument_group("training (preset or train.py recipe defaults when omitted)"))
    g = p.add_argument_group("target and auto-adjust")
    g.add_argument("--target-ppl", type=common.float_flag(0, lo_open=True), default=None,
                   help=f"goal for --target-metric, lower is better (default {DEFAULT_TARGET_PPL:g} word ppl for "
                        "WikiText-103, none otherwise)")
    g.add_argument("--target-metric", choices=TARGET_METRICS, default="word_ppl",
                   help="which test figure the target applies to (char_ppl: perplexity per character)")
    g.add_argument("--max-rounds", type=common.int_flag(1), default=3, help="training rounds at most (1 = no auto-adjust)")
    g.add_argument("--test-max-kb", type=common.int_flag(1), default=300, help="size cap of the held-out test text, KB")
    p.add_argument("--samples", type=common.int_flag(0), default=3, help="generated samples in the report")
    p.add_argument("--max-new-tokens", type=common.int_flag(1), default=60, help="tokens per generated sample")
    p.add_argument("--sample-tokens", dest="max_new_tokens", type=common.int_flag(1), help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, metavar="PATH", help="also write report.json's content here")
    common.add_quiet_flag(p)
    return p


def _add_training_flags(g) -> None:
    preset, recipe = "default: the preset's", "train.py's recipe for the model, see train.py --help"
    for flag, typ, what in (("--max-steps", common.int_flag(1), f"optimizer steps of the first round ({preset})"),
                            ("--batch-size", common.int_flag(1), f"sequences per micro-batch ({preset}, else {recipe})"),
                            ("--grad-accum", common.int_flag(1), f"micro-batches per optimizer step ({preset}, else "
                                                             f"{recipe})"),
                            ("--seq-len", common.int_flag(2), f"tokens per sequence ({preset})"),
                            ("--lr", common.float_flag(0, lo_open=True), f"peak learning rate of the first round "
                                                                     f"(default: {recipe}; a given --lr wins)"),
                            ("--warmup", common.int_flag(0), f"warmup steps of the first round (default: "
                                                         f"{recipe}: 2%% of the steps)"),
                            ("--eval-interval", common.int_flag(1), f"evaluate (and save) every N steps ({preset})"),
                            ("--eval-iters", common.int_flag(1), f"val batches per evaluation ({preset})")):
        g.add_argument(flag, type=typ, default=None, help=what)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"muon (Muon + AdamW for the embedding and norms) or adamw, as train.py --optimizer "
                        f"(default: {recipe})")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help=f"wsd (warmup-stable-decay: a 'more steps' round continues the run from its "
                        f"fishai-stable.pt) or cosine (a 'more steps' round restarts from the best checkpoint "
                        f"with a rewarm), as train.py --schedule (default: {recipe})")
    common.add_device_flag(g)
    common.add_dtype_flag(g, "training precision, as train.py --dtype")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=common.int_flag(0), default=1337,
                   help="seed of round 1 (round r: seed + r - 1; a round that continues a WSD run keeps its seed)")
    g.add_argument("--time-budget", type=common.float_flag(0), default=None, metavar="SECONDS",
                   help="fit the whole job in about this time: the first round's --max-steps is cut to what "
                        "the measured speed allows (default 300 for tiny, off for the others; 0 = off; an "
                        "explicit --max-steps is never changed)")
    g.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a preset field (see train.py --help; by default none)")


@dataclass
class Job:
    """One quick_train run: its flags, where it writes, and what it decided and why."""
    args: argparse.Namespace
    out: Path
    device: torch.device
    t0: float
    target: float | None
    test_texts: list[str] = field(default_factory=list)
    test_label: str = ""
    budget: float | None = None  # seconds of --time-budget in effect, or None
    planned_steps: int = 0  # the first round's steps before the time budget cut them
    vocab: int = 0  # the tokenizer's vocab (the model's, rounded up: train.round_up)
    decisions: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(f"[quick_train] {msg}", flush=True)

    def decide(self, msg: str, prefix: str = "") -> None:
        self.decisions.append(msg)
        self.log(prefix + msg)

    def time_left(self) -> float:
        return self.budget - (time.time() - self.t0)


# ----------------------------------------------------------------------------- data

def _is_default_wikitext(data: str) -> bool:
    return data.startswith("hf:wikitext:wikitext-103")


def offline_message(data: str) -> str:
    return (f"WikiText-103 (the default --data {data}) could not be loaded from the Hugging Face hub (offline?); "
            "pass --data FILE|DIR|hf:NAME, or start with the no-download run: "
            "python quick_train.py --config tiny --data python-docs")


class Corpus:
    """The --data documents as one stream (at most max_bytes), split by the hold-out rule
    (data_utils.holdout_split with val_fraction and test_fraction): the tokenizer reads the train
    and val documents, prepare reads the whole stream and leaves the test documents out by the same
    rule, and the test set is the first test documents."""

    def __init__(self, source: str, text_key: str, val_fraction: float, test_fraction: float,
                 max_bytes: int | None, txt_mode: str = "block"):
        self.source, self.text_key, self.max_bytes, self.txt_mode = source, text_key, max_bytes, txt_mode
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def documents(self, epoch: int = 0):
        """The stream (the epoch argument makes it a DataMixer source)."""
        budget = self.max_bytes
        for doc in readers.iter_documents(self.source, text_key=self.text_key, txt_mode=self.txt_mode):
            yield doc
            if budget is not None:
                budget -= len(doc.encode("utf-8"))
                if budget <= 0:
                    return

    def split(self, i: int) -> str:
        return data_utils.holdout_split(i, self.val_fraction, self.test_fraction)

    def tokenizer_documents(self):
        return (doc for i, doc in enumerate(self.documents()) if self.split(i) != "test")

    def test_documents(self, max_bytes: int) -> list[str]:
        docs, size = [], 0
        for i, doc in enumerate(self.documents()):
            if size >= max_bytes:
                break
            if self.split(i) == "test":
                docs.append(doc)
                size += len(doc.encode("utf-8"))
        return docs


def open_corpus(args) -> Corpus:
    """The --data stream; the default HF dataset fails fast and clearly when it cannot be reached."""
    try:
        first = next(iter(readers.iter_documents(args.data, text_key=args.text_key, txt_mode=args.txt_mode)), None)
    except common.DataError:
        if _is_default_wikitext(args.data):
            raise QuickTrainError(offline_message(args.data)) from None
        raise
    if first is None:
        raise QuickTrainError(f"--data {args.data}: no documents found")
    held_out = args.test_data is None and not _is_default_wikitext(args.data)
    max_bytes = None if args.max_data_mb is None else int(args.max_data_mb * 1e6)
    return Corpus(args.data, args.text_key, args.val_fraction, TEST_FRACTION if held_out else 0.0, max_bytes,
                  args.txt_mode)


def load_test_texts(spec: str | None, corpus: Corpus, data: str, text_key: str,
                    max_bytes: int) -> tuple[list[str], str]:
    """-> (texts, label)."""
    if spec is None:
        if _is_default_wikitext(data):
            try:
                return scoring.load_eval_texts("wikitext103"), "WikiText-103 test"
            except scoring.ScoringError:
                raise QuickTrainError(offline_message(data)) from None
        docs = corpus.test_documents(max_bytes)
        if not docs:
            raise QuickTrainError(f"--data {data}: too few documents to hold out a test set; pass --test-data")
        return docs, f"held-out documents of {data}"
    name, path = scoring.parse_eval_spec(spec)
    if name in scoring.EVAL_SETS:
        return scoring.load_eval_texts(name, path), f"{scoring.DATASET_LABELS[name]} test"
    docs = list(readers.iter_documents(spec, text_key=text_key))
    if not docs:
        raise QuickTrainError(f"--test-data {spec}: no text found")
    return docs, spec


def get_tokenizer(job: Job, corpus: Corpus, preset: dict) -> tuple[text_tokenizer.TextTokenizer, str]:
    """--tokenizer, or a byte-level BPE trained here on the train and val documents."""
    args = job.args
    if args.tokenizer:
        return text_tokenizer.load_tokenizer(args.tokenizer), str(args.tokenizer)
    vocab = args.vocab_size or preset["vocab_size"]
    tok_dir = job.out / "tokenizer"
    job.log(f"training a {vocab}-token byte-level BPE tokenizer on {args.data} (test documents left out)")
    t = time.time()
    tokenizer_train.train_tokenizer(corpus.tokenizer_documents(), vocab, tok_dir, show_progress=not args.quiet)
    tok = text_tokenizer.load_tokenizer(tok_dir)
    return tok, f"trained here (vocab {tok.vocab_size}, {time.time() - t:.1f} s)"


def prepare_data(job: Job, corpus: Corpus, tok: text_tokenizer.TextTokenizer, seq_len: int) -> dict:
    """train.bin/val.bin in <out>/data from the same stream; prepare leaves the test documents out."""
    args = job.args
    job.log(f"tokenizing {args.data} into {job.out / 'data'}")
    meta = data_utils.prepare(mix={"data": (1.0, corpus.documents)}, tokenizer=tok, output=str(job.out / "data"),
                      val_fraction=corpus.val_fraction, test_fraction=corpus.test_fraction, overwrite=True,
                      show_progress=not args.quiet, seed=args.seed, log=job.log)
    if meta["val"]["tokens"] < seq_len + 1:
        raise QuickTrainError(f"only {meta['val']['tokens']} validation tokens: raise --val-fraction or give more "
                              f"--data (need > --seq-len {seq_len})")
    return meta


# ----------------------------------------------------------------------------- time budget

def measure_train_speed(config_name: str, overrides: list[str], vocab: int, batch_size: int, seq_len: int,
                        device, steps: int = 5, train_args=None) -> float:
    """Tokens/s of forward+backward+optimizer step for this model and batch on this machine: the
    median of `steps` real steps on random tokens after one warm-up step (the median resists a busy
    machine). The optimizer is the round's (optim.build_optimizer of train_args: Muon or AdamW),
    AdamW when train_args is None."""
    cfg = train.build_config(config_name, train.round_up(vocab), train.parse_overrides(overrides))
    m = GPT(cfg).to(device)
    opt = (optim.build_optimizer(m, train_args, device) if train_args is not None
           else optim.configure_optimizers(m, device_type=device.type))
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        _, loss = m(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del m, opt
    return batch_size * seq_len / statistics.median(times[1:])


def pick_cpu_threads(measure) -> tuple[float, str | None]:
    """On a CPU, compare the default OpenMP threads with one thread and keep the faster: small models
    on a few (or busy) cores often run faster on one thread, since idle threads spin against other
    processes. Returns (tokens/s, decision or None)."""
    n = torch.get_num_threads()
    tps_n = measure()
    if n <= 1:
        return tps_n, None
    torch.set_num_threads(1)
    tps_1 = measure()
    if tps_1 > 1.1 * tps_n:
        return tps_1, (f"threads: 1 thread ran {tps_1:,.0f} tokens/s vs {tps_n:,.0f} with {n}, so training "
                       "uses 1 thread (set OMP_NUM_THREADS to choose)")
    torch.set_num_threads(n)
    return tps_n, None


def fit_time_budget(job: Job, settings: dict, preset: dict, vocab: int) -> None:
    """With a --time-budget (and no explicit --max-steps), measure the speed here and cut the first
    round's steps to what fits; say so when that leaves too few steps for a useful model."""
    args = job.args
    budget = args.time_budget if args.time_budget is not None else preset.get("time_budget")
    job.planned_steps = settings["max_steps"]
    job.budget = budget if (budget and args.max_steps is None) else None
    if not job.budget:
        return

    _, targs = recipe_settings(args, settings, vocab)

    def measure():
        return measure_train_speed(args.config, args.model_override, vocab, settings["batch_size"],
                                   settings["seq_len"], job.device, train_args=targs)
    if job.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        tps, why_threads = pick_cpu_threads(measure)
        if why_threads:
            job.decide(why_threads)
    else:
        tps = measure()
    # ~15% of what is left goes to evaluation, the test perplexity and the samples
    left = job.time_left()
    fit = int(0.85 * left * tps / (settings["batch_size"] * settings["grad_accum"] * settings["seq_len"]))
    planned = settings["max_steps"]
    if fit >= planned:
        job.decide(f"time budget: {tps:,.0f} tokens/s measured here; {planned} steps fit the {left:.0f} s left "
                   f"of --time-budget {job.budget:g}")
        return
    new_steps = max(20, fit)
    job.decide(f"time budget: {left:.0f} s left of --time-budget {job.budget:g} at {tps:,.0f} tokens/s measured "
               f"here fit ~{fit} steps, so --max-steps {planned} -> {new_steps} (pass --max-steps or "
               f"--time-budget 0 to keep {planned})")
    settings["max_steps"] = new_steps
    if settings["warmup"] is not None:  # a given --warmup; the recipe's is a share of the (new) steps
        settings["warmup"] = min(settings["warmup"], max(1, new_steps // 10))
    settings["eval_interval"] = min(settings["eval_interval"], max(1, new_steps // 5))
    if new_steps < UNDERTRAINED_SHARE * planned:
        job.log("warning: " + undertrained_message(job, new_steps, "leaves time for"))


def undertrained_message(job: Job, steps: int, verb: str = "left time for") -> str:
    return (f"the model is undertrained: the --time-budget of {job.budget:g} s {verb} {steps} of the "
            f"{job.planned_steps} planned steps ({steps / max(job.planned_steps, 1):.0%}, under "
            f"{UNDERTRAINED_SHARE:.0%}) on this machine, so expect a weak model and poor samples. To train all "
            f"{job.planned_steps} steps pass --time-budget 0 (or a larger budget)"
            + ("" if os.environ.get("OMP_NUM_THREADS") else "; on a busy machine OMP_NUM_THREADS=1 (fewer threads) "
               "often trains faster"))


def undertrained(job: Job, rounds: list[dict]) -> str | None:
    """The rule: with a time budget in effect, fewer trained steps (all rounds) than
    UNDERTRAINED_SHARE of the planned ones. Returns the message, or None."""
    steps = sum(r["steps"] for r in rounds)
    if job.budget and steps < UNDERTRAINED_SHARE * job.planned_steps:
        return undertrained_message(job, steps)
    return None


# ----------------------------------------------------------------------------- auto-adjust

def decide_next_round(round_info: dict, settings: dict, prev_rounds: list[dict]) -> tuple[dict | None, str]:
    """Pick the next round's settings after a missed target; (None, reason) means stop.

    round_info: {"val_losses": [...], "diverged": bool, "test_metric": float}, and for the WSD
    continuation "stable_checkpoint" (the round's fishai-stable.pt, or None when it wrote none),
    "stable_step"; "end_step", "stopped_by" and "decay_start" say why there is none.
    settings: this round's settings as it ran {"max_steps", "lr", "warmup", "schedule", ...}.
    The next round starts from the best checkpoint (fresh optimizer) unless the settings carry
    "resume": continue that fishai-stable.pt exactly (train.py --resume). Every rule states why."""
    steps, lr = int(settings["max_steps"]), float(settings["lr"])
    nxt = {k: v for k, v in settings.items() if k != "resume"}
    if round_info.get("diverged"):
        nxt["lr"] = lr / 3
        nxt["warmup"] = max(1, 2 * int(settings["warmup"]))
        return nxt, (f"the loss diverged (NaN/inf): continue from the best checkpoint with the peak LR cut to "
                     f"{nxt['lr']:.2e} (/3) and a longer rewarm of {nxt['warmup']} steps")
    if prev_rounds:
        before = prev_rounds[-1]["test_metric"]
        now = round_info["test_metric"]
        if math.isfinite(before) and now > before * 0.99:
            return None, (f"the last round improved the test perplexity by under 1% ({before:.2f} -> {now:.2f}): "
                          "the model/data is the limit; stop (try a bigger --config or more --data)")
    vals = [v for v in round_info.get("val_losses", []) if math.isfinite(v)]
    if len(vals) >= 2 and (vals[-2] - vals[-1]) / max(vals[-2], 1e-9) > 0.01:
        drop = (vals[-2] - vals[-1]) / vals[-2] * 100
        falling = f"val loss was still falling ({drop:.1f}% over the last eval interval): undertrained"
        stable = round_info.get("stable_checkpoint")
        if settings.get("schedule", "wsd") == "wsd" and stable:
            nxt["max_steps"] = steps + steps
            nxt["resume"] = stable
            return nxt, (f"{falling}, so continue the WSD run from {stable} (step {round_info.get('stable_step')}, "
                         f"where its LR decay began) with --max-steps {steps} -> {nxt['max_steps']}: the stable "
                         f"phase goes on at the same peak LR {lr:.2e} with no rewarm (the optimizer state and the "
                         f"data position carry over) and the decay moves to the new end, so the result is exactly "
                         f"a {nxt['max_steps']}-step WSD run")
        nxt["max_steps"] = steps
        nxt["lr"] = lr * 0.5
        nxt["warmup"] = max(1, steps // 10)
        return nxt, (f"{falling}{_no_continuation(round_info, settings)}, so train {steps} more steps from the best "
                     f"checkpoint with peak LR {nxt['lr']:.2e} (x0.5: trained weights want smaller steps than a "
                     f"fresh model) after a {nxt['warmup']}-step rewarm (the fresh optimizer state needs one)")
    if len(vals) >= 2 and vals[-1] > min(vals) * 1.01:
        nxt["max_steps"] = max(1, steps // 2)
        nxt["lr"] = lr * 0.3
        nxt["warmup"] = max(1, nxt["max_steps"] // 10)
        return nxt, (f"val loss rose from its best ({min(vals):.4f} -> {vals[-1]:.4f}): overfitting or LR too "
                     f"high, so continue from the best checkpoint for {nxt['max_steps']} steps at peak LR "
                     f"{nxt['lr']:.2e} (x0.3)")
    nxt["lr"] = lr * 0.3
    nxt["warmup"] = max(1, steps // 10)
    return nxt, (f"val loss plateaued: anneal from the best checkpoint for {steps} more steps at a lower peak "
                 f"LR {nxt['lr']:.2e} (x0.3)")


def _no_continuation(round_info: dict, settings: dict) -> str:
    """Why an undertrained round is not continued from its fishai-stable.pt (the fallback's reason)."""
    if settings.get("schedule", "wsd") != "wsd":
        return (f"; with --schedule {settings['schedule']} the LR has already decayed to its floor and there is "
                "no stable phase to continue")
    end, decay = round_info.get("end_step"), round_info.get("decay_start")
    if round_info.get("stopped_by") == "max_time" and end is not None and decay is not None and end < decay:
        return (f"; the round left no fishai-stable.pt to continue: the time budget stopped it at step {end}, "
                f"before its LR decay began at step {decay}")
    if decay is not None and decay >= int(settings["max_steps"]):
        return (f"; the round left no fishai-stable.pt to continue: a {settings['max_steps']}-step run has no "
                "decay phase")
    return "; the round left no fishai-stable.pt to continue"


# ----------------------------------------------------------------------------- rounds

def train_round(job: Job, r: int, settings: dict, init_from: Path | None) -> tuple[dict, bool, dict] | None:
    """train.py as a library for round r -> (its summary, diverged, the settings it ran with), or
    None when the time budget is used up before the round starts. settings["resume"] (a
    fishai-stable.pt) continues that run exactly: only RESUME_SAFE flags are passed (the new
    --max-steps and this round's intervals), the rest comes from the checkpoint (train.RESUME_RULE)."""
    args, rdir = job.args, job.out / f"round{r}"
    max_time = None
    if job.budget:
        remaining = job.time_left()
        if r > 1 and remaining < 30:
            job.decide(f"round {r}: not started, the --time-budget {job.budget:g} s is used up", "decision: ")
            return None
        # the speed estimate can be off on a busy machine: a hard cap keeps the job in its budget
        # (~10% of the time stays for the test perplexity and the samples)
        max_time = max(10.0, 0.9 * remaining - 5)
    shared = dict(config=args.config, model_override=args.model_override, output_dir=str(rdir),
                  eval_interval=settings["eval_interval"], eval_iters=settings["eval_iters"],
                  save_interval=settings["eval_interval"], log_interval=5, device=args.device, dtype=args.dtype,
                  compile=args.compile, overwrite=True, quiet=args.quiet, max_time=max_time)
    resume = settings.get("resume")
    if resume:
        ran = dict(settings)  # the checkpoint's settings (the previous round's) with the new max_steps
        train_args = train.make_args(**shared, resume=str(resume), max_steps=settings["max_steps"])
        origin, lr_from = f", continuing {resume} (no rewarm)", " (the checkpoint's)"
    else:
        ran, _ = recipe_settings(args, settings, job.vocab)
        train_args = train.make_args(
            **shared, **{k: settings[k] for k in SETTINGS if k not in shared}, data=str(job.out / "data"),
            seed=args.seed + r - 1, init_from=str(init_from) if init_from else None)
        origin = f", from {init_from}" if init_from else ", from scratch"
        lr_from = " (train.py's recipe)" if settings.get("lr") is None else ""
    job.log(f"round {r}: {ran['max_steps']} steps, {ran['optimizer']} + {ran['schedule']}, peak LR "
            f"{ran['lr']:.2e}{lr_from}, warmup {ran['warmup']}{origin}")
    try:
        return train.train(train_args), False, ran
    except train.DivergedError as e:
        job.log(f"round {r}: {e}")
        return {"tokens": 0, "steps": 0, "best_val_loss": None, "interrupted": None}, True, ran


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(step, tokens seen) of a train.py checkpoint."""
    ckpt = load_checkpoint(str(path))
    return int(ckpt.get("step") or 0), int((ckpt.get("extra") or {}).get("tokens_seen") or 0)


def score_round(job: Job, r: int, ckpt: Path) -> dict:
    lm = scoring.load_lm(str(ckpt), device=str(job.device))
    job.log(f"round {r}: test perplexity on {job.test_label}")
    try:
        # bits/byte, token/word/char perplexity and `spaced` (whether word figures mean anything)
        return scoring.perplexity(lm, job.test_texts, batch_size=8, progress=not job.args.quiet)
    finally:
        del lm


def run_round(job: Job, r: int, settings: dict, init_from: Path | None, step_offset: int) -> dict | None:
    """Train and score round r -> its record for the report (None: not started). A round that
    continues a WSD run (settings["resume"]) starts at that checkpoint's step: its steps and tokens
    count from there, and its metrics.jsonl steps are the run's (so its loss curve shares the
    continued round's step_offset)."""
    t_r = time.time()
    trained = train_round(job, r, settings, init_from)
    if trained is None:
        return None
    summary, diverged, ran = trained
    if summary.get("lr") is not None:
        ran["lr"] = summary["lr"]  # train.py's own account of the peak LR it ran with
    if summary.get("interrupted"):
        raise RoundInterrupted(r, job.out / f"round{r}", summary["steps"], summary["interrupted"])
    if summary.get("stopped_by") == "max_time":
        job.decide(f"round {r}: stopped at step {summary['steps']} of {settings['max_steps']} to stay within "
                   f"--time-budget {job.budget:g} s (this machine was slower than measured)")
    resume = settings.get("resume")
    start_step, start_tokens = checkpoint_position(Path(resume)) if resume else (0, 0)
    end_step = max(start_step, int(summary.get("steps") or 0))
    rdir = job.out / f"round{r}"
    metrics = train.read_metrics(rdir / train.METRICS_NAME) if (rdir / train.METRICS_NAME).exists() else []
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    best = rdir / train.BEST_NAME
    test = score_round(job, r, best) if best.exists() else None
    # a continued round's best val loss starts at the checkpoint's; without its own fishai-best.pt
    # it never beat that, so report what it reached itself
    rv = summary.get("best_val_loss") if best.exists() else min((v for v in val_losses if math.isfinite(v)),
                                                                 default=None)
    stable = rdir / train.STABLE_NAME
    decay_start = (optim.WSDSchedule(ran["lr"], ran["warmup"], ran["max_steps"],
                                       decay_frac=train.RECIPE_DECAY_FRAC).decay_start
                   if ran["schedule"] == "wsd" else None)
    return {"round": r, "settings": {k: v for k, v in ran.items() if k != "resume"},
            "init_from": str(init_from) if init_from else None, "resumed_from": str(resume) if resume else None,
            "start_step": start_step, "end_step": end_step, "steps": end_step - start_step,
            "tokens": max(0, int(summary.get("tokens") or 0) - start_tokens), "stopped_by": summary.get("stopped_by"),
            "time_s": time.time() - t_r, "best_val_loss": rv, "val_ppl": math.exp(rv) if rv is not None else None,
            "test": test, "diverged": diverged, "val_losses": val_losses,
            "checkpoint": str(best) if test else None, "metrics": metrics, "step_offset": step_offset,
            "decay_start": decay_start, "stable_checkpoint": str(stable) if stable.exists() else None,
            "stable_step": checkpoint_position(stable)[0] if stable.exists() else None,
            "test_metric": test[job.args.target_metric] if test else float("inf")}


def _test_line(t: dict) -> str:
    second = (f"word ppl {_f(t.get('word_ppl'), 2)}" if t.get("spaced", True) else
              f"char ppl {_f(t.get('char_ppl'), 3)}, {_f(t.get('chars_per_token'), 2)} chars/token")
    return f"{_f(t.get('bits_per_byte'), 3)} bits/byte, token ppl {_f(t.get('token_ppl'), 2)}, {second}"


def judge_round(job: Job, info: dict, rounds: list[dict], have_ckpt: bool) -> tuple[dict | None, bool]:
    """After round r: (the next round's settings, or None to stop; target met)."""
    r, metric, target = info["round"], job.args.target_metric, job.target
    if info["test"]:
        job.log(f"round {r}: val loss {info['best_val_loss']:.4f} (ppl {info['val_ppl']:.2f}); test "
                + _test_line(info["test"]))
    if target is None:
        job.decisions.append(f"round {r}: no target set, done after one round")
        return None, False
    if info["test"] and info["test_metric"] <= target:
        job.decisions.append(f"round {r}: test {metric} {info['test_metric']:.2f} <= target {target:g}: target met, stop")
        return None, True
    missed = f"round {r}: test {metric} {info['test_metric']:.2f} > target {target:g}"
    if r == job.args.max_rounds:
        job.decisions.append(f"{missed}; --max-rounds {job.args.max_rounds} reached, stop")
        return None, False
    if not have_ckpt:
        raise QuickTrainFailed(f"round {r} produced no usable checkpoint (diverged before the first eval); "
                               "lower --lr or raise --warmup")
    nxt, why = decide_next_round(info, info["settings"], rounds[:-1])
    job.decide(f"{missed}; {why}", "decision: ")
    return nxt, False


def run_rounds(job: Job, settings: dict) -> tuple[list[dict], Path | None, float | None, bool]:
    """Rounds until the target is met, a rule says stop, or --max-rounds / the time budget ends.
    Returns (rounds, best checkpoint, its val loss, target met)."""
    rounds: list[dict] = []
    best_ckpt, best_val = None, None
    for r in range(1, job.args.max_rounds + 1):
        # loss-curve x = step + step_offset: a fresh or init-from round starts where the last one
        # ended; a continuation counts the continued run's steps, so it shares that round's offset
        prev, resume = (rounds[-1] if rounds else None), settings.get("resume")
        step_offset = 0 if prev is None else prev["step_offset"] + (0 if resume else prev["end_step"])
        info = run_round(job, r, settings, None if resume else best_ckpt, step_offset)
        if info is None:
            break
        rounds.append(info)
        rv = info["best_val_loss"]
        if rv is not None and info["checkpoint"] and (best_val is None or rv < best_val):
            best_val, best_ckpt = rv, job.out / f"round{r}" / train.BEST_NAME
        settings, met = judge_round(job, info, rounds, best_ckpt is not None)
        if settings is None:
            return rounds, best_ckpt, best_val, met
    return rounds, best_ckpt, best_val, False


# ----------------------------------------------------------------------------- report

def report_markdown(rep: dict) -> str:
    m, t = rep["target_metric"], rep["test"] or {}
    spaced = t.get("spaced", True)
    lines = [f"# quick_train report: {rep['config']} on {rep['data']}", ""]
    if rep.get("undertrained"):
        lines += [f"> **Warning: {rep['undertrained']}.**", ""]
    lines += [f"- headline: **{_f(t.get('bits_per_byte'), 3)} bits/byte** on the test set (lower is better; "
              "comparable across tokenizers and languages)",
              f"- date: {rep['date']}; device: {rep['device']}; total time: {rep['total_time_s']:.0f} s; "
              f"tokens seen: {rep['tokens_seen']:,}",
              f"- model: {rep['params'] / 1e6:.2f}M parameters, vocab {rep['vocab_size']}; tokenizer: {rep['tokenizer']}",
              f"- test set: {rep['test_set']} ({rep['test_tokens']:,} tokens)"]
    if not spaced:
        lines.append(f"- the test text has no spaces between words: word perplexity means nothing there, so the "
                     f"table shows perplexity per character ({_f(t.get('chars_per_token'), 2)} characters per token)")
    if rep["target_ppl"] is not None:
        lines.append(f"- target: {m} <= {rep['target_ppl']:g} -> **{'met' if rep['target_met'] else 'missed'}**")
    else:
        lines.append("- target: none (pass --target-ppl to enable auto-adjust)")
    last = "test word ppl" if spaced else "test char ppl"
    lines += ["", f"| round | steps | optimizer + schedule | peak LR | warmup | tokens | time s | best val loss "
              f"| val ppl | test bits/byte | test token ppl | {last} |", "|---" * 12 + "|"]
    for r in rep["rounds"]:
        rt, st = r["test"] or {}, r["settings"]
        steps = f"{r['steps']} of {st['max_steps']}"
        if r.get("start_step"):  # a continued WSD run: its steps go on from the stable checkpoint's
            steps = f"{r['steps']} (steps {r['start_step'] + 1}-{r['end_step']} of {st['max_steps']})"
        recipe = f"{st.get('optimizer') or '-'} + {st.get('schedule') or '-'}"
        if r.get("resumed_from"):
            recipe += ", continued"
        lines.append(f"| {r['round']} | {steps} | {recipe} | {st['lr']:.2e} | "
                     f"{st['warmup']} | {r['tokens']:,} | {r['time_s']:.0f} | "
                     f"{_f(r['best_val_loss'], 4)} | {_f(r['val_ppl'], 2)} | {_f(rt.get('bits_per_byte'), 3)} | "
                     f"{_f(rt.get('token_ppl'), 2)} | {_f(rt.get('word_ppl' if spaced else 'char_ppl'), 2)} |")
    lines += ["", "## Decisions", ""] + [f"- {d}" for d in rep["decisions"]]
    lines += ["", "## Loss curve", ""]
    lines.append("![loss curve](loss_curve.png)" if rep.get("loss_curve") else f"{rep.get('loss_curve_note')}")
    lines += ["", "## Samples", ""]
    if rep.get("undertrained") and rep["samples"]:
        lines += ["The model is undertrained (see the warning at the top): these samples show how far it got, "
                  "not what the recipe can do.", ""]
    for s in rep["samples"]:
        lines += [f"**{s['prompt']}**", "", "```", s["prompt"] + s["completion"], "```", ""]
    lines += [f"Best checkpoint: `{rep['best_checkpoint']}`", ""]
    return "\n".join(lines)


def _f(v, nd):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def generate_samples(ckpt: Path, prompts: list[str], n_tokens: int, device: str, seed: int) -> list[dict]:
    m = load_model(str(ckpt), device=device)
    g = torch.Generator(device=m.tok_emb.weight.device).manual_seed(seed)
    return [{"prompt": p, "completion": m.tokenizer.decode(train.sample_tokens(m, m.tokenizer.encode(p), n_tokens, g))}
            for p in prompts]


def write_report(job: Job, rounds: list[dict], best_ckpt: Path, best_val: float, target_met: bool,
                 meta: dict, tok_label: str) -> dict:
    """fishai-best.pt, samples, loss curve, report.json/.md (and --json) in <out>."""
    args, out = job.args, job.out
    final = out / train.BEST_NAME
    with open(best_ckpt, "rb") as src:
        common.atomic_write(final, lambda f: shutil.copyfileobj(src, f))
    best_round = next(r for r in rounds if r["checkpoint"] == str(best_ckpt))
    prompts = SAMPLE_PROMPTS.get(args.data, SAMPLE_PROMPTS[None])[:args.samples]
    samples = generate_samples(final, prompts, args.max_new_tokens, str(job.device), args.seed) if prompts else []
    cfg = ModelConfig.from_dict(load_checkpoint(str(final))["config"])
    rep = {
        "date": time.strftime("%Y-%m-%d"), "config": args.config, "data": args.data, "device": str(job.device),
        "tokenizer": tok_label, "vocab_size": cfg.vocab_size, "params": count_params(cfg),
        "test_set": job.test_label, "test_tokens": (best_round["test"] or {}).get("tokens", 0),
        "headline_metric": "bits_per_byte", "target_ppl": job.target, "target_metric": args.target_metric,
        "target_met": target_met, "undertrained": undertrained(job, rounds),
        "rounds": [{k: v for k, v in r.items() if k != "metrics"} for r in rounds],
        "decisions": job.decisions, "best_round": best_round["round"], "best_checkpoint": str(final),
        "best_val_loss": best_val, "test": best_round["test"], "tokens_seen": sum(r["tokens"] for r in rounds),
        "total_time_s": time.time() - job.t0, "samples": samples,
        "data_meta": {"train_tokens": meta["train"]["tokens"], "val_tokens": meta["val"]["tokens"],
                      "test_docs_left_out": meta.get("test_docs_left_out", 0)},
    }
    note = train.plot_losses([{"metrics": r["metrics"], "step_offset": r["step_offset"], "label": f"round {r['round']}"}
                                for r in rounds], out / train.LOSS_CURVE_NAME)
    rep["loss_curve"] = None if note else str(out / train.LOSS_CURVE_NAME)
    rep["loss_curve_note"] = note
    if note:
        job.log(f"note: {note}")
    common.write_json(out / "report.json", rep)
    common.atomic_write_text(out / "report.md", report_markdown(rep))
    if args.json:
        common.write_json(args.json, rep)
    return rep


# ----------------------------------------------------------------------------- main flow

def first_settings(args) -> dict:
    """Round 1's settings: each flag given, else the preset's, else None (train.py's recipe)."""
    preset = PRESET_DEFAULTS[args.config]
    return {k: (getattr(args, k) if getattr(args, k) is not None else preset.get(k)) for k in SETTINGS}


def recipe_settings(args, settings: dict, vocab: int) -> tuple[dict, argparse.Namespace]:
    """(settings with every None filled as train.py fills it, the train args that gives): train's
    own rule (train.apply_recipe, RECIPE_RULE) for this model, so quick_train can show and plan
    with the numbers a round will run with while still passing None to train."""
    targs = train.make_args(config=args.config, model_override=args.model_override,
                              **{k: settings.get(k) for k in SETTINGS})
    cfg = train.build_config(args.config, train.round_up(vocab), train.parse_overrides(args.model_override))
    train.apply_recipe(targs, cfg)
    return {**settings, **{k: getattr(targs, k) for k in SETTINGS}}, targs


RUN_OUTPUTS = {"data": "prepared", "tokenizer": "tokenizer", train.BEST_NAME: "checkpoint",
               train.LOSS_CURVE_NAME: "png", "report.json": "json", "report.md": "text"}


def is_run_output(name: str) -> str | None:
    """The kind of file quick_train writes under this name in --output-dir (None: not one of its
    names). --overwrite replaces a name only when it holds that kind: a user's own data/ is kept."""
    return RUN_OUTPUTS.get(name) or ("run" if name.startswith("round") and name[5:].isdigit() else None)


def output_plan(args) -> tuple[list, list]:
    """What a run writes (--output-dir, a folder of its own: anything there that quick_train did not
    write is refused even with --overwrite; --json) and reads (--data, --test-data, --tokenizer)."""
    return ([common.Output(args.output_dir, "--output-dir", "run", owns=is_run_output, whole=True),
             common.Output(args.json, "--json", "json")],
            [("--data", args.data), ("--test-data", args.test_data), ("--tokenizer", args.tokenizer)])


def open_output_dir(out: Path, overwrite: bool) -> bool:
    """Make --output-dir (checked by output_plan) ready; returns True when this run created it."""
    created = common.check_writable_dir(out)
    if overwrite:
        for sub in ["data"] + [p.name for p in out.glob("round*")]:
            shutil.rmtree(out / sub, ignore_errors=True)
    return created


def remove_partial_run(job: Job, created: bool) -> None:
    """A failed or interrupted run leaves nothing behind: the directory it created, or else what it
    wrote into the existing one."""
    if created:
        shutil.rmtree(job.out, ignore_errors=True)
        return
    for sub in ["data", *([] if job.args.tokenizer else ["tokenizer"])] + [p.name for p in job.out.glob("round*")]:
        shutil.rmtree(job.out / sub, ignore_errors=True)


def quick_train(args) -> dict:
    common.check_plan(*output_plan(args), args.overwrite)
    device = common.resolve_device(args.device)  # e.g. --device cuda on a CPU machine: refused before any work
    target = args.target_ppl if args.target_ppl is not None else (
        DEFAULT_TARGET_PPL if _is_default_wikitext(args.data) and args.target_metric == "word_ppl" else None)
    job = Job(args, Path(args.output_dir), device, time.time(), target)
    created = open_output_dir(job.out, args.overwrite)
    try:
        return _pipeline(job)
    except RoundInterrupted:
        raise  # the round saved its state: the run is kept and can be continued
    except BaseException:
        remove_partial_run(job, created)
        raise


def _pipeline(job: Job) -> dict:
    args, preset = job.args, PRESET_DEFAULTS[job.args.config]
    settings = first_settings(args)
    corpus = open_corpus(args)
    job.test_texts, job.test_label = load_test_texts(args.test_data, corpus, args.data, args.text_key,
                                                     args.test_max_kb * 1000)
    job.log(f"test set: {job.test_label} ({len(job.test_texts)} documents, "
            f"{sum(len(t) for t in job.test_texts) / 1e3:.0f} KB)")
    tok, tok_label = get_tokenizer(job, corpus, preset)
    job.vocab = tok.vocab_size
    filled, _ = recipe_settings(args, settings, job.vocab)  # the batch sets the speed and tokens per step
    settings.update(batch_size=filled["batch_size"], grad_accum=filled["grad_accum"])
    meta = prepare_data(job, corpus, tok, settings["seq_len"])
    fit_time_budget(job, settings, preset, tok.vocab_size)
    rounds, best_ckpt, best_val, target_met = run_rounds(job, settings)
    if best_ckpt is None:
        raise QuickTrainFailed("no round produced a checkpoint; lower --lr or raise --warmup")
    rep = write_report(job, rounds, best_ckpt, best_val, target_met, meta, tok_label)
    job.log(f"done in {rep['total_time_s']:.0f} s: {len(rounds)} round(s), {rep['tokens_seen']:,} tokens; test "
            + _test_line(rep["test"] or {})
            + (f"; target {job.target:g} {'met' if target_met else 'missed'}" if job.target is not None else "")
            + f"; report: {job.out / 'report.md'}")
    if rep["undertrained"]:
        job.log(f"warning: {rep['undertrained']}")
    for s in rep["samples"]:
        print(f"[sample] {s['prompt']!r} -> {s['completion']!r}")
    return rep


def quick_train_command(args) -> int:
    try:
        quick_train(args)
    except RoundInterrupted as e:
        latest = e.round_dir / train.LATEST_NAME
        print(f"interrupted in round {e.round_no}: kept {args.output_dir} with the round's state at step {e.step} "
              f"({latest}); continue that round with `python train.py --resume {latest} --output-dir "
              f"{e.round_dir}`, or start over with quick_train.py --overwrite", file=sys.stderr, flush=True)
        return common.EXIT_INTERRUPTED
    return common.EXIT_OK


def main(argv=None) -> int:
    return common.run_cli(quick_train_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
