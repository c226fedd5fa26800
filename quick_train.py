"""
Train + benchmark in one command: tokenizer (if none given) -> prepare -> train -> test perplexity
(benchmark.py) -> auto-adjust and continue while a perplexity target is missed -> report.

Usage (copy-paste):

  # first run, no download, no GPU: Python's bundled docs, ~5 minutes on 2 CPU cores
  python quick_train.py --config tiny --data python-docs

  # the seed's command: FishAI-Small on WikiText-103 (HF wikitext-103-raw-v1), target word ppl <= 56
  python quick_train.py --config small --max-steps 5000 --device cuda

  # your own text, an existing tokenizer, a target and up to 3 rounds
  python quick_train.py --config small --data corpus/ --tokenizer tokenizer/ --target-ppl 40 --max-rounds 3

Outputs in --output-dir (default runs/quick): tokenizer/, data/ (train.bin/val.bin), round1/ ...
(checkpoints + metrics.jsonl of each round), fishai-best.pt (the best round's best checkpoint),
report.md, report.json, loss_curve.png (when matplotlib is installed) and the generated samples
(in the report).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from data_utils import atomic_write, atomic_write_text

DEFAULT_DATA = "hf:wikitext:wikitext-103-raw-v1"  # train split; the test split is the benchmark
DEFAULT_TARGET_PPL = 56.0  # the seed's WikiText-103 goal (word-level perplexity)

# Per-preset defaults: `tiny` is sized so `--data python-docs` finishes in about 5 minutes on a
# 2-core CPU (measured, docs/RESULTS.md); the others follow train.py's defaults.
PRESET_DEFAULTS = {
    "tiny": dict(time_budget=300, max_steps=500, batch_size=8, grad_accum=1, seq_len=256, lr=2e-3, warmup=25, eval_interval=100,
                 eval_iters=8, vocab_size=4096),
    "small": dict(max_steps=5000, batch_size=4, grad_accum=8, seq_len=512, lr=5e-4, warmup=100,
                  eval_interval=250, eval_iters=50, vocab_size=32000),
    "medium": dict(max_steps=10000, batch_size=4, grad_accum=8, seq_len=1024, lr=3e-4, warmup=200,
                   eval_interval=500, eval_iters=50, vocab_size=32000),
    "large": dict(max_steps=20000, batch_size=2, grad_accum=16, seq_len=1024, lr=2e-4, warmup=500,
                  eval_interval=500, eval_iters=50, vocab_size=32000),
}

SAMPLE_PROMPTS = {
    "python-docs": ["The list type", "Return a new", "This module provides"],
    None: ["The history of the city", "In 1998, the", "The first"],
}


class QuickTrainError(Exception):
    """Bad input or an unrecoverable problem; main() prints it as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokenizer + data + training + perplexity benchmark in one command, with auto-adjust.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="small", help="model preset (tiny, small, medium, large)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="training text: file/dir/glob (txt, jsonl, parquet), hf:NAME[:CONFIG[:SPLIT]] or "
                        "python-docs (Python's bundled documentation: no download)")
    p.add_argument("--text-key", default="text", help="field with the text in jsonl/parquet/HF data")
    p.add_argument("--test-data", default=None,
                   help="benchmark texts: wikitext103[:PATH], wikitext2[:PATH], ptb[:PATH] or a text source; "
                        "default: WikiText-103 test for the default --data, else every 20th document of "
                        "--data (held out from training)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir; trained on --data when omitted")
    p.add_argument("--vocab-size", type=int, default=None, help="vocab of the trained tokenizer (preset default)")
    p.add_argument("--max-data-mb", type=float, default=None, help="use at most this many MB of --data")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out for validation")
    p.add_argument("--output-dir", default="runs/quick")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --output-dir (replaces its run)")
    g = p.add_argument_group("training (preset defaults when omitted)")
    for flag, typ in (("--max-steps", int), ("--batch-size", int), ("--grad-accum", int), ("--seq-len", int),
                      ("--lr", float), ("--warmup", int), ("--eval-interval", int), ("--eval-iters", int)):
        g.add_argument(flag, type=typ, default=None)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--compile", action="store_true")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fit the whole job in about this time: the first round's --max-steps is cut to what "
                        "the measured speed allows (default 300 for tiny, off for the others; 0 = off; an "
                        "explicit --max-steps is never changed)")
    g.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change a preset field (see train.py --help)")
    g = p.add_argument_group("target and auto-adjust")
    g.add_argument("--target-ppl", type=float, default=None,
                   help=f"test perplexity goal (default {DEFAULT_TARGET_PPL:g} for WikiText-103, none otherwise)")
    g.add_argument("--target-metric", choices=["word_ppl", "token_ppl"], default="word_ppl",
                   help="which perplexity the target applies to")
    g.add_argument("--max-rounds", type=int, default=3, help="training rounds at most (1 = no auto-adjust)")
    g.add_argument("--test-max-kb", type=int, default=300, help="size cap of held-out test text, KB")
    p.add_argument("--samples", type=int, default=3, help="generated samples in the report")
    p.add_argument("--sample-tokens", type=int, default=60)
    p.add_argument("--json", default=None, metavar="PATH", help="also write report.json's content here")
    p.add_argument("--no-progress", action="store_true")
    return p


# ----------------------------------------------------------------------------- data

def _is_default_wikitext(data: str) -> bool:
    return data.startswith("hf:wikitext:wikitext-103")


def offline_message(data: str) -> str:
    return (f"WikiText-103 (the default --data {data}) could not be loaded from the Hugging Face hub (offline?); "
            "pass --data FILE|DIR|hf:NAME, or start with the no-download run: "
            "python quick_train.py --config tiny --data python-docs")


class Corpus:
    """The --data documents with a deterministic held-out test slice.

    Test documents are every 20th document (index % 20 == 10) among the first ones, up to
    test_max_bytes; they are excluded from tokenizer training, train and val."""

    def __init__(self, source: str, text_key: str, held_out: bool, test_max_bytes: int, max_bytes: int | None):
        import data_utils
        self.du = data_utils
        self.source, self.text_key, self.max_bytes = source, text_key, max_bytes
        self.test_ids: set[int] = set()
        self.test_docs: list[str] = []
        if held_out:
            size = 0
            for i, doc in enumerate(self._raw()):
                if i >= 20 * 1000 or size >= test_max_bytes:
                    break
                if i % 20 == 10:
                    self.test_ids.add(i)
                    self.test_docs.append(doc)
                    size += len(doc.encode("utf-8"))

    def _raw(self):
        return self.du.iter_documents(self.source, text_key=self.text_key)

    def train_docs(self, epoch: int = 0):
        budget = None if self.max_bytes is None else int(self.max_bytes)
        for i, doc in enumerate(self._raw()):
            if i in self.test_ids:
                continue
            yield doc
            if budget is not None:
                budget -= len(doc.encode("utf-8"))
                if budget <= 0:
                    return


def load_test_texts(spec: str | None, corpus: Corpus, data: str, text_key: str) -> tuple[list[str], str]:
    """-> (texts, label)."""
    import data_utils
    if spec is None:
        if _is_default_wikitext(data):
            try:
                return data_utils.load_eval_texts("wikitext103", split="test"), "WikiText-103 test"
            except data_utils.DataError:
                raise QuickTrainError(offline_message(data))
        if not corpus.test_docs:
            raise QuickTrainError(f"--data {data}: too few documents to hold out a test slice; pass --test-data")
        return corpus.test_docs, f"held-out documents of {data}"
    name, _, path = spec.partition(":")
    if name.lower() in ("wikitext103", "wikitext2", "ptb"):
        label = {"wikitext103": "WikiText-103 test", "wikitext2": "WikiText-2 test", "ptb": "PTB test"}[name.lower()]
        return data_utils.load_eval_texts(name.lower(), path=path or None, split="test"), label
    docs = list(data_utils.iter_documents(spec, text_key=text_key))
    if not docs:
        raise QuickTrainError(f"--test-data {spec}: no text found")
    return docs, spec


# ----------------------------------------------------------------------------- auto-adjust

def measure_train_speed(config_name: str, overrides: list[str], vocab: int, batch_size: int, seq_len: int,
                        device, steps: int = 5) -> float:
    """Tokens/s of forward+backward+AdamW for this model and batch on this machine: the median of
    `steps` real steps on random tokens after one warm-up step (the median resists a busy machine)."""
    import statistics
    import torch
    import model as fishai
    import train as trainer
    cfg = trainer.build_config(fishai, config_name, trainer.round_up(vocab), trainer.parse_overrides(overrides))
    m = fishai.GPT(cfg).to(device)
    opt = fishai.configure_optimizers(m, device_type=device.type)
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
    import torch
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


def decide_next_round(round_info: dict, settings: dict, prev_rounds: list[dict]) -> tuple[dict | None, str]:
    """Pick the next round's settings after a missed target; (None, reason) means stop.

    round_info: {"val_losses": [...], "diverged": bool, "test_metric": float}
    settings: this round's {"max_steps", "lr", "warmup", ...}. Every rule states why."""
    steps, lr = int(settings["max_steps"]), float(settings["lr"])
    nxt = dict(settings)
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
        nxt["max_steps"] = steps
        nxt["lr"] = lr * 0.5
        nxt["warmup"] = max(1, steps // 10)
        return nxt, (f"val loss was still falling ({drop:.1f}% over the last eval interval): undertrained, so "
                     f"train {steps} more steps from the best checkpoint with peak LR {nxt['lr']:.2e} (x0.5) "
                     f"after a {nxt['warmup']}-step rewarm")
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


# ----------------------------------------------------------------------------- report

def plot_losses(rounds: list[dict], path: Path) -> str | None:
    """PNG of train/val loss over cumulative steps; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss_curve.png skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rounds:
        tr = [(m["step"] + r["step_offset"], m["loss"]) for m in r["metrics"] if "loss" in m]
        va = [(m["step"] + r["step_offset"], m["val_loss"]) for m in r["metrics"] if "val_loss" in m]
        if tr:
            ax.plot(*zip(*tr), lw=1, label=f"train (round {r['round']})")
        if va:
            ax.plot(*zip(*va), "o-", lw=1.5, label=f"val (round {r['round']})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return None


def report_markdown(rep: dict) -> str:
    m = rep["target_metric"]
    lines = [f"# quick_train report: {rep['config']} on {rep['data']}", "",
             f"- date: {rep['date']}; device: {rep['device']}; total time: {rep['total_time_s']:.0f} s; "
             f"tokens seen: {rep['tokens_seen']:,}",
             f"- model: {rep['params'] / 1e6:.2f}M parameters, vocab {rep['vocab_size']}; tokenizer: {rep['tokenizer']}",
             f"- test set: {rep['test_set']} ({rep['test_tokens']:,} tokens)"]
    if rep["target_ppl"] is not None:
        lines.append(f"- target: {m} <= {rep['target_ppl']:g} -> **{'met' if rep['target_met'] else 'missed'}**")
    else:
        lines.append("- target: none (pass --target-ppl to enable auto-adjust)")
    lines += ["", "| round | steps | peak LR | warmup | tokens | time s | best val loss | val ppl | test token ppl "
              "| test word ppl | test bits/byte |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rounds"]:
        t = r["test"] or {}
        lines.append(f"| {r['round']} | {r['steps']} of {r['settings']['max_steps']} | {r['settings']['lr']:.2e} | "
                     f"{r['settings']['warmup']} | {r['tokens']:,} | {r['time_s']:.0f} | "
                     f"{_f(r['best_val_loss'], 4)} | {_f(r['val_ppl'], 2)} | {_f(t.get('token_ppl'), 2)} | "
                     f"{_f(t.get('word_ppl'), 2)} | {_f(t.get('bits_per_byte'), 3)} |")
    lines += ["", "## Decisions", ""]
    lines += [f"- {d}" for d in rep["decisions"]]
    lines += ["", "## Loss curve", ""]
    lines.append("![loss curve](loss_curve.png)" if rep.get("loss_curve") else f"{rep.get('loss_curve_note')}")
    lines += ["", "## Samples", ""]
    for s in rep["samples"]:
        lines += [f"**{s['prompt']}**", "", "```", s["prompt"] + s["completion"], "```", ""]
    lines += [f"Best checkpoint: `{rep['best_checkpoint']}`", ""]
    return "\n".join(lines)


def _f(v, nd):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def generate_samples(ckpt: Path, prompts: list[str], n_tokens: int, device: str, seed: int) -> list[dict]:
    import torch
    import model as fishai
    m = fishai.load_model(str(ckpt), device=device)
    out = []
    g = torch.Generator(device=m.tok_emb.weight.device).manual_seed(seed)
    for p in prompts:
        ids = m.tokenizer.encode(p)
        x = torch.tensor([ids], dtype=torch.long, device=m.tok_emb.weight.device)
        y = m.generate(x, n_tokens, temperature=0.8, top_k=40, eos_id=m.tokenizer.eos_id, generator=g)
        new = [t for t in y[0, len(ids):].tolist() if t != m.tokenizer.eos_id]
        out.append({"prompt": p, "completion": m.tokenizer.decode(new)})
    return out


# ----------------------------------------------------------------------------- main flow

def quick_train(args) -> dict:
    import data_utils
    import train as trainer
    import benchmark
    import model as fishai

    t0 = time.time()
    log = print
    if args.config not in PRESET_DEFAULTS:
        raise QuickTrainError(f"--config {args.config}: unknown config; choose one of {', '.join(PRESET_DEFAULTS)}")
    if args.max_rounds < 1:
        raise QuickTrainError(f"--max-rounds must be >= 1 (got {args.max_rounds})")
    d = PRESET_DEFAULTS[args.config]
    settings = {k: (getattr(args, k) if getattr(args, k) is not None else d[k])
                for k in ("max_steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup", "eval_interval",
                          "eval_iters")}
    target = args.target_ppl if args.target_ppl is not None else (
        DEFAULT_TARGET_PPL if _is_default_wikitext(args.data) else None)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise QuickTrainError(f"--output-dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise QuickTrainError(f"--output-dir {out} is not empty; pass --overwrite to replace its run or choose "
                              "another directory")
    try:
        trainer._check_writable_dir(out)
    except trainer.TrainError as e:
        raise QuickTrainError(str(e)) from None
    if args.overwrite:
        for sub in ["data"] + [p.name for p in out.glob("round*")]:
            shutil.rmtree(out / sub, ignore_errors=True)

    # ---- data (fail fast and clearly when the default HF dataset cannot be reached)
    held_out = args.test_data is None and not _is_default_wikitext(args.data)
    try:
        first = next(iter(data_utils.iter_documents(args.data, text_key=args.text_key)), None)
    except data_utils.DataError:
        if _is_default_wikitext(args.data):
            raise QuickTrainError(offline_message(args.data))
        raise
    if first is None:
        raise QuickTrainError(f"--data {args.data}: no documents found")
    max_bytes = None if args.max_data_mb is None else int(args.max_data_mb * 1e6)
    corpus = Corpus(args.data, args.text_key, held_out, args.test_max_kb * 1000, max_bytes)
    test_texts, test_label = load_test_texts(args.test_data, corpus, args.data, args.text_key)
    log(f"[quick_train] test set: {test_label} ({len(test_texts)} documents, "
        f"{sum(len(t) for t in test_texts) / 1e3:.0f} KB)")

    # ---- tokenizer
    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
        tok = data_utils.load_tokenizer(tok_dir)
        tok_label = str(tok_dir)
    else:
        from tokenizer_train import train_tokenizer
        vocab = args.vocab_size or d["vocab_size"]
        tok_dir = out / "tokenizer"
        log(f"[quick_train] training a {vocab}-token byte-level BPE tokenizer on {args.data}")
        t_tok = time.time()
        train_tokenizer(corpus.train_docs(), vocab, tok_dir, show_progress=not args.no_progress,
                        max_bytes=max_bytes)
        tok = data_utils.load_tokenizer(tok_dir)
        tok_label = f"trained here (vocab {tok.vocab_size}, {time.time() - t_tok:.1f} s)"

    # ---- prepare train/val .bin
    log(f"[quick_train] tokenizing {args.data} into {out / 'data'}")
    meta = data_utils.prepare(mix={"data": (1.0, corpus.train_docs)}, tokenizer=tok, output=str(out / "data"),
                              val_fraction=args.val_fraction, overwrite=True, show_progress=not args.no_progress,
                              seed=args.seed, log=lambda s: log("[quick_train] " + s))
    if meta["val"]["tokens"] < settings["seq_len"] + 1:
        raise QuickTrainError(f"only {meta['val']['tokens']} validation tokens: raise --val-fraction or give more "
                              f"--data (need > --seq-len {settings['seq_len']})")

    # ---- rounds
    device = trainer.resolve_device(args.device)
    decisions: list[str] = []
    budget = args.time_budget if args.time_budget is not None else d.get("time_budget")
    budget = budget if (budget and args.max_steps is None) else None
    if budget:
        def measure():
            return measure_train_speed(args.config, args.model_override, tok.vocab_size, settings["batch_size"],
                                       settings["seq_len"], device)
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            tps, why_threads = pick_cpu_threads(measure)
            if why_threads:
                decisions.append(why_threads)
                log(f"[quick_train] {why_threads}")
        else:
            tps = measure()
        # ~15% of what is left goes to evaluation, the test perplexity and the samples
        left = budget - (time.time() - t0)
        fit = int(0.85 * left * tps / (settings["batch_size"] * settings["grad_accum"] * settings["seq_len"]))
        if fit < settings["max_steps"]:
            new_steps = max(20, fit)
            why = (f"time budget: {left:.0f} s left of --time-budget {budget:g} at {tps:,.0f} tokens/s measured "
                   f"here fit ~{fit} steps, so --max-steps {settings['max_steps']} -> {new_steps} "
                   f"(pass --max-steps or --time-budget 0 to keep {settings['max_steps']})")
            settings["max_steps"] = new_steps
            settings["warmup"] = min(settings["warmup"], max(1, new_steps // 10))
            settings["eval_interval"] = min(settings["eval_interval"], max(1, new_steps // 5))
        else:
            why = (f"time budget: {tps:,.0f} tokens/s measured here; {settings['max_steps']} steps fit the "
                   f"{left:.0f} s left of --time-budget {budget:g}")
        decisions.append(why)
        log(f"[quick_train] {why}")
    rounds: list[dict] = []
    best_ckpt = None
    best_val = None
    step_offset = 0
    tokens_seen = 0
    target_met = False
    for r in range(1, args.max_rounds + 1):
        rdir = out / f"round{r}"
        argv = ["--config", args.config, "--data", str(out / "data"), "--output-dir", str(rdir),
                "--max-steps", str(settings["max_steps"]), "--batch-size", str(settings["batch_size"]),
                "--grad-accum", str(settings["grad_accum"]), "--seq-len", str(settings["seq_len"]),
                "--lr", str(settings["lr"]), "--warmup", str(settings["warmup"]),
                "--eval-interval", str(settings["eval_interval"]), "--eval-iters", str(settings["eval_iters"]),
                "--save-interval", str(settings["eval_interval"]), "--log-interval", "5",
                "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed + r - 1), "--overwrite"]
        for o in args.model_override:
            argv += ["--model-override", o]
        if args.compile:
            argv.append("--compile")
        if args.no_progress:
            argv.append("--no-progress")
        if best_ckpt is not None:
            argv += ["--init-from", str(best_ckpt)]
        if budget:
            remaining = budget - (time.time() - t0)
            if r > 1 and remaining < 30:
                decisions.append(f"round {r}: not started, the --time-budget {budget:g} s is used up")
                log(f"[quick_train] decision: {decisions[-1]}")
                break
            # the speed estimate can be off on a busy machine: a hard cap keeps the job in its budget
            # (~10% of the time stays for the test perplexity and the samples)
            argv += ["--max-time", f"{max(10.0, 0.9 * remaining - 5):.0f}"]
        log(f"[quick_train] round {r}: {settings['max_steps']} steps, peak LR {settings['lr']:.2e}, warmup "
            f"{settings['warmup']}" + (f", from {best_ckpt}" if best_ckpt else ", from scratch"))
        t_r = time.time()
        diverged = False
        try:
            summary = trainer.train(trainer.parse_args(argv))
        except trainer.TrainError as e:
            if "NaN/inf" not in str(e):
                raise
            log(f"[quick_train] round {r}: {e}")
            diverged = True
            summary = {"tokens": 0, "best_val_loss": None, "interrupted": None}
        if summary.get("interrupted"):
            raise QuickTrainError(f"interrupted ({summary['interrupted']}) during round {r}; checkpoints are in {rdir}")
        if summary.get("stopped_by") == "max_time":
            decisions.append(f"round {r}: stopped at step {summary['steps']} of {settings['max_steps']} to stay within "
                             f"--time-budget {budget:g} s (this machine was slower than measured)")
            log(f"[quick_train] {decisions[-1]}")
        metrics = trainer.read_metrics(rdir / trainer.METRICS_NAME) if (rdir / trainer.METRICS_NAME).exists() else []
        val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
        round_best = rdir / trainer.BEST_NAME
        test = None
        if round_best.exists():
            lm = benchmark.load_lm(str(round_best), device=str(device))
            log(f"[quick_train] round {r}: test perplexity on {test_label}")
            test = benchmark.perplexity(lm, test_texts, batch_size=8, progress=not args.no_progress)
            del lm
        rv = summary.get("best_val_loss")
        info = {"round": r, "settings": dict(settings), "init_from": str(best_ckpt) if best_ckpt else None,
                "steps": settings["max_steps"], "tokens": int(summary.get("tokens") or 0), "time_s": time.time() - t_r,
                "best_val_loss": rv, "val_ppl": math.exp(rv) if rv is not None else None, "test": test,
                "diverged": diverged, "val_losses": val_losses, "checkpoint": str(round_best) if test else None,
                "metrics": metrics, "step_offset": step_offset,
                "test_metric": test[args.target_metric] if test else float("inf")}
        info["steps"] = int(summary.get("steps") or settings["max_steps"])
        rounds.append(info)
        step_offset += info["steps"]
        tokens_seen += info["tokens"]
        if rv is not None and (best_val is None or rv < best_val):
            best_val, best_ckpt = rv, round_best
        if test:
            log(f"[quick_train] round {r}: val loss {rv:.4f} (ppl {math.exp(rv):.2f}); test token ppl "
                f"{test['token_ppl']:.2f}, word ppl {test['word_ppl']:.2f}, {test['bits_per_byte']:.3f} bits/byte")
        if target is None:
            decisions.append(f"round {r}: no target set, done after one round")
            break
        if test and test[args.target_metric] <= target:
            target_met = True
            decisions.append(f"round {r}: test {args.target_metric} {test[args.target_metric]:.2f} <= target "
                             f"{target:g}: target met, stop")
            break
        if r == args.max_rounds:
            decisions.append(f"round {r}: test {args.target_metric} {info['test_metric']:.2f} > target {target:g}; "
                             f"--max-rounds {args.max_rounds} reached, stop")
            break
        if best_ckpt is None:
            raise QuickTrainError(f"round {r} produced no usable checkpoint (diverged before the first eval); "
                                  "lower --lr or raise --warmup")
        nxt, why = decide_next_round(info, settings, rounds[:-1])
        decisions.append(f"round {r}: test {args.target_metric} {info['test_metric']:.2f} > target {target:g}; {why}")
        log(f"[quick_train] decision: {decisions[-1]}")
        if nxt is None:
            break
        settings = nxt

    # ---- final artefacts
    if best_ckpt is None:
        raise QuickTrainError("no round produced a checkpoint")
    final = out / trainer.BEST_NAME
    with open(best_ckpt, "rb") as src:
        atomic_write(final, lambda f: shutil.copyfileobj(src, f))
    best_round = next(r for r in rounds if r["checkpoint"] == str(best_ckpt))
    prompts = SAMPLE_PROMPTS.get(args.data, SAMPLE_PROMPTS[None])[: max(0, args.samples)]
    samples = generate_samples(final, prompts, args.sample_tokens, str(device), args.seed) if prompts else []
    ck = fishai.load_checkpoint(str(final))
    cfg = fishai.ModelConfig.from_dict(ck["config"])
    rep = {
        "date": time.strftime("%Y-%m-%d"), "config": args.config, "data": args.data, "device": str(device),
        "tokenizer": tok_label, "vocab_size": cfg.vocab_size, "params": fishai.count_params(cfg),
        "test_set": test_label, "test_tokens": (best_round["test"] or {}).get("tokens", 0),
        "target_ppl": target, "target_metric": args.target_metric, "target_met": target_met,
        "rounds": [{k: v for k, v in r.items() if k not in ("metrics",)} for r in rounds],
        "decisions": decisions, "best_round": best_round["round"], "best_checkpoint": str(final),
        "best_val_loss": best_val, "test": best_round["test"], "tokens_seen": tokens_seen,
        "total_time_s": time.time() - t0, "samples": samples, "data_meta": {
            "train_tokens": meta["train"]["tokens"], "val_tokens": meta["val"]["tokens"]},
    }
    note = plot_losses(rounds, out / "loss_curve.png")
    rep["loss_curve"] = None if note else str(out / "loss_curve.png")
    rep["loss_curve_note"] = note
    if note:
        log(f"[quick_train] note: {note}")
    atomic_write_text(out / "report.json", json.dumps(rep, indent=2))
    atomic_write_text(out / "report.md", report_markdown(rep))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rep, indent=2))
    t = rep["test"] or {}
    log(f"[quick_train] done in {rep['total_time_s']:.0f} s: {len(rounds)} round(s), {tokens_seen:,} tokens; "
        f"test word ppl {_f(t.get('word_ppl'), 2)}, token ppl {_f(t.get('token_ppl'), 2)}"
        + (f"; target {target:g} {'met' if target_met else 'missed'}" if target is not None else "")
        + f"; report: {out / 'report.md'}")
    for s in samples:
        log(f"[sample] {s['prompt']}{s['completion']!r}")
    return rep


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import train as trainer
    try:
        quick_train(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (QuickTrainError, trainer.TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the shared modules' bad-input errors
        import data_utils
        import model as fishai
        import benchmark
        if isinstance(e, (data_utils.DataError, fishai.CheckpointError, benchmark.BenchmarkError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
