"""Benchmark a FishAI model: self-test (correctness + speed vs transformers), perplexity, generation quality,
the data pipeline, the training recipe, serve.py under load, and the one GPU check.

Scoring goes through scoring.py (`load_lm`, `LM`, `loglikelihood`, `perplexity`), the ONE code path of
benchmark.py, reference_benchmark.py, evaluate.py, quantize.py, quick_train.py and serve.py, so every
model (FishAI or any transformers causal LM) is scored the same way. Nothing imports this file.

Usage:
    # does the model build, train and decode correctly on this machine, and how fast vs transformers?
    python benchmark.py self-test --config tiny --device cpu
    python benchmark.py self-test --config small --device cuda --dtype bf16 --compile --json st.json
    python benchmark.py self-test --config small --device cpu --threads 1 --clock cpu   # steady on a busy CPU

    # perplexity (WikiText-103 / WikiText-2 / PTB test from the HF hub, or local files) + generation quality
    python benchmark.py full --model checkpoints/fishai-best.pt --device cuda
    python benchmark.py full --model checkpoints/fishai-best.pt --json results.json \\
        --wikitext103 ../shared/data/wikitext103/wiki.test.tokens --ptb ../shared/data/ptb/ptb.valid.txt
    python benchmark.py full --model fishai-int4.bin --data mytext=notes.txt --stride 512 --limit 20
    python benchmark.py full --model checkpoints/fishai-best.pt --max-chars 20000 \\
        --data hongloumeng=../shared/data/books_zh/24264_hongloumeng.txt   # Chinese: char_ppl

    # data_utils.py prepare end to end vs bare encode_batch, and its peak memory at 1x and 10x the corpus
    python benchmark.py data --input books/ --tokenizer tokenizer/ --json prepare-bench.json

    # the training recipe: AdamW + cosine (LR x warmup swept, widened at an edge) vs the default (Muon +
    # WSD), same model, data and tokens; val curves, held-out bits/byte, tokens to the baseline's loss
    python benchmark.py recipe --data ../shared/data/books --json recipe.json --report recipe.md

    # serve.py under load: one stream vs 8 concurrent, time to first token, server vs generate.py
    OMP_NUM_THREADS=1 python benchmark.py serve --configs tiny,small --json serve.json

    # on a GPU: verify and measure (CUDA tests, self-test, a timed train.py run, decode, recipe)
    python benchmark.py gpu --data ../shared/data/books --json gpu-check.json

Scoring conventions (lm-evaluation-harness "loglikelihood_rolling"; README "benchmark.py" has the
long form): every document is scored from its FIRST token after one "begin" token (BOS, else EOS:
for FishAI the <|endoftext|> that precedes every training document), in windows of the context
length; --stride (default: the context, disjoint windows) is the number of new tokens per window.
The headline is bits_per_byte = -sum logprob / bytes / ln 2 (independent of the tokenizer); beside
it word_ppl (words = len(re.split(r"\\s+", text)), as the harness) for spaced text, and char_ppl for
text without spaces between words (Chinese), both counted on the original text.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import common
import cpu_kernels
import data_utils
import engine
from model import (CONFIGS, GPT, IGNORE_INDEX, count_params, device_peak_flops,
                   estimate_mfu, get_config, load_model, model_bytes, save_checkpoint, to_hf)
from optim import configure_optimizers
from quantized import HalfLinear, int4_linear, int4_mode, int8_linear, quantize_rtn
import readers
import scoring
import text_tokenizer
import tokenizer_train
import train


# ----------------------------------------------------------------------------------------------
# command line

_AUTO_DTYPE = "auto = bf16 on CUDA (fp16 where unsupported), fp32 on CPU"


SPEED_GROUPS = ("prefill", "decode", "train", "compiled-decode", "quantized", "kernels")  # SPEED_BY_GROUP's keys


def _add_self_test_parser(sub):
    st = sub.add_parser("self-test", help="build a preset, check correctness, measure speed vs HF Llama",
                        description="Build a preset with random weights, check that it computes what it should "
                        "(KV cache, HF parity, training) and time it against transformers.LlamaForCausalLM.")
    st.add_argument("--config", default="tiny", help="model preset: tiny, small, medium or large")
    common.add_device_flag(st)
    common.add_dtype_flag(st, f"autocast dtype of the training checks and the timings; {_AUTO_DTYPE}")
    st.add_argument("--compile", action="store_true", help="also check and time torch.compile: the training "
                    "step and a static-cache decode step (CUDA graphs on GPU)")
    st.add_argument("--batch-size", type=common.int_flag(1), default=None, help="training batch (default 4 CPU / 16 CUDA)")
    st.add_argument("--seq-len", type=common.int_flag(2), default=None,
                    help="training/prefill length (default 256 CPU / 1024 CUDA)")
    st.add_argument("--prompt-len", type=common.int_flag(1), default=32, help="decode prompt length")
    st.add_argument("--max-new-tokens", dest="decode_tokens", type=common.int_flag(1), default=None,
                    help="tokens decoded per timed run (default 32 CPU / 128 CUDA)")
    st.add_argument("--decode-tokens", dest="decode_tokens", type=common.int_flag(1), default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)
    st.add_argument("--repeat", type=common.int_flag(1), default=3, help="timed runs per measurement; the median is kept")
    st.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time with the wall clock or with process CPU time (CPU only: steadier on a busy "
                         "machine; speeds are then tokens per CPU-second)")
    st.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    st.add_argument("--no-quantized", dest="quantized", action="store_false",
                    help="skip the quantized rows (the same weights as fp16/int8/int4/mixed .bin files, "
                         "against HF and, when llama-cpp-python is installed, llama.cpp on the GGUF export) "
                         "and the kernel rows (FishAI's CPU matmuls against torch's)")
    st.add_argument("--threads", type=common.int_flag(1), default=None, help="CPU threads for torch (default: torch's "
                    "choice); 1 gives steadier numbers on a busy machine")
    st.add_argument("--seed", type=common.int_flag(0), default=0, help="seed of the random weights and inputs")
    st.add_argument("--only", default=None, metavar="GROUP,...",
                    help="time only these row groups: " + ", ".join(SPEED_GROUPS) + " (the checks always run)")
    common.add_output_flags(st)


def _add_full_parser(sub):
    fu = sub.add_parser("full", help="bits/byte and perplexity on WikiText-103/WikiText-2/PTB, generation quality",
                        description="Score a model's bits per byte and perplexity on the standard test sets or "
                        "local files, and measure its generation on fixed prompts.")
    fu.add_argument("--model", default="checkpoints/fishai-best.pt",
                    help="checkpoint .pt, quantized .bin, HF dir (or hub name with --hf)")
    fu.add_argument("--hf", action="store_true", help="load --model through transformers AutoModelForCausalLM")
    common.add_dequantize_flag(fu)
    common.add_device_flag(fu)
    common.add_dtype_flag(fu, f"dtype the model runs in; {_AUTO_DTYPE}")
    common.add_eval_text_flags(fu)  # shared with reference_benchmark.py, whose --help needs no torch
    fu.add_argument("--no-generation", action="store_true", help="skip the generation-quality samples")
    fu.add_argument("--samples", type=common.int_flag(1), default=2, help="samples per prompt")
    fu.add_argument("--max-new-tokens", type=common.int_flag(1), default=64, help="new tokens per sample")
    fu.add_argument("--gen-tokens", dest="max_new_tokens", type=common.int_flag(1), default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)
    fu.add_argument("--temperature", type=common.float_flag(0), default=0.8, help="sampling temperature; 0 = greedy")
    fu.add_argument("--top-k", type=common.int_flag(0), default=50, help="top-k sampling, 0 = off")
    fu.add_argument("--seed", type=common.int_flag(0), default=1234, help="sampling seed")
    common.add_output_flags(fu, "write the results as JSON (per dataset: bits_per_byte, word_ppl, char_ppl, "
                        "token_ppl and the counts they come from)")


def _add_data_parser(sub):
    da = sub.add_parser("data", help="data_utils.py prepare end to end vs bare encode_batch; peak memory at 1x/Nx",
                        description="Throughput of data_utils.py prepare (read, filter, encode, write) against "
                        "bare encode_batch on the same documents, and prepare's peak memory at 1x and Nx the corpus.")
    da.add_argument("--input", required=True, help="corpus (any readers.iter_documents source)")
    da.add_argument("--tokenizer", required=True, help="tokenizer dir")
    da.add_argument("--filter", default="default", help="filter spec used by prepare")
    da.add_argument("--scale", type=common.int_flag(1), default=10,
                    help="the large corpus is this many copies (memory check; 1 = no large corpus)")
    da.add_argument("--repeat", type=common.int_flag(1), default=3,
                    help="alternate bare / end-to-end runs this often, keep the best")
    da.add_argument("--workdir", default=None, help="keep temp corpora here (default: a temp dir, removed)")
    common.add_output_flags(da)


def _add_recipe_parser(sub):
    re_ = sub.add_parser("recipe", help="train one preset with AdamW+cosine (LR swept) and the default recipe "
                         "on the same data and tokens; val curves, held-out bits/byte, tokens to the baseline's loss",
                         description="The training-recipe comparison: the same preset, data and token budget, "
                         "trained with the AdamW + cosine baseline at several LRs and with train.py's default "
                         "recipe. Whole documents (books) are held out for the test bits/byte.")
    re_.add_argument("--config", default="tiny", help="model preset")
    re_.add_argument("--data", default="../shared/data/books",
                     help="a directory of text files, one document (book) each; every 10th is held out as test")
    re_.add_argument("--tokens", type=common.size_flag, default=300_000, help="training tokens per run (e.g. 300K, 2M)")
    re_.add_argument("--baseline-lrs", default="0.5,1,2", metavar="X,Y,...",
                     help="baseline LRs as multiples of the AdamW recipe LR (train.RECIPE_RULE)")
    re_.add_argument("--baseline-warmups", default="0.02,0.1", metavar="X,Y,...",
                     help="baseline warmups as shares of the steps (each LR runs with each); nanoGPT's runs warm "
                          "up over a few percent to ~10%% of their steps")
    re_.add_argument("--max-extend", type=common.int_flag(0), default=2,
                     help="baseline runs added (half the lowest or twice the highest LR) while the best baseline "
                          "LR is at an edge of the sweep")
    re_.add_argument("--default-lrs", default="1", metavar="X,Y,...",
                     help="LRs of the default recipe, as multiples of its own LR (1 = the default; a sweep "
                          "shows how the preset's LR was chosen)")
    re_.add_argument("--vocab-size", type=common.int_flag(300), default=4096, help="BPE vocabulary trained on the "
                     "training documents")
    re_.add_argument("--test-chars", type=common.size_flag, default=200_000,
                     help="characters scored from each held-out document")
    re_.add_argument("--evals", type=common.int_flag(2), default=12, help="val-loss evaluations per run (the curve)")
    re_.add_argument("--eval-iters", type=common.int_flag(1), default=8, help="val batches per evaluation")
    re_.add_argument("--seed", type=common.int_flag(0), default=1337, help="seed of every run (data order, weights)")
    re_.add_argument("--workdir", default=None, help="keep the tokenizer, data and runs here (default: temp dir)")
    common.add_device_flag(re_)
    common.add_dtype_flag(re_, f"training dtype; {_AUTO_DTYPE}")
    re_.add_argument("--compile", action="store_true", help="torch.compile every run")
    re_.add_argument("--png", metavar="PATH", help="write the val-loss curves as PNG (default: beside --report)")
    common.add_output_flags(re_)


GPU_STEPS = ("data", "train", "profile", "self-test", "pytest", "recipe")
# Each step's seconds at the default --budget (their sum); another --budget scales them all. The
# order puts the figures most wanted first and the slowest, most optional steps (the cuda tests,
# the recipe comparison) last, so a spent budget costs only theirs; a step that ends early leaves
# its time to the steps after it (GpuCheck.left).
# Sized from the H200 run of docs/RESULTS.md: tokenizer + prepare 8 s, train.py 34 s beyond its --max-time.
GPU_STEP_SECONDS = {"data": 15, "train": 65, "profile": 45, "self-test": 75, "pytest": 70, "recipe": 30}
GPU_BUDGET = sum(GPU_STEP_SECONDS.values())  # 300 s: one call, with device time left for a second one
GPU_TRAIN_STARTUP = 35  # seconds of the train step outside train.py's --max-time (imports, data, the last save)


def _add_gpu_parser(sub):
    gp = sub.add_parser("gpu", help="on a GPU: verify and measure - the CUDA tests, the self-test, a timed train.py "
                        "run, a profile of one training and one decode step, decode speed and the recipe "
                        "comparison, into one JSON",
                        description="The one GPU check: runs, each as a child process with its own time limit, "
                        "(1) a tokenizer and prepared data from --data, (2) a --seconds train.py run of --config "
                        "(tokens/s, MFU), (3) a torch.profiler summary of one train.py training step and one "
                        "compiled decode step of the engine (top kernels, GPU time, how long the GPU waits for "
                        "the host) and the engine's batch-1 and batch-8 decode tokens/s, (4) the self-test of "
                        "--config with torch.compile and the quantized rows (the isolated train step vs HF in "
                        "the same step, compiled decode vs HF static-cache generate), (5) python -m pytest "
                        "tests -m cuda, (6) the recipe comparison. Results go into one JSON as each step ends, "
                        "so a step that fails or runs out of time costs only its own figures. Refused without "
                        "a CUDA GPU.")
    gp.add_argument("--data", default="../shared/data/books", help="a directory of text files (books): tokenizer, "
                    "training data and the recipe comparison")
    gp.add_argument("--config", default="small", help="model preset of the train run, the profile and the self-test")
    gp.add_argument("--vocab-size", type=common.int_flag(300), default=32000, help="tokenizer vocabulary (32000: the "
                    "preset's, so the train run and the self-test time the same shapes)")
    gp.add_argument("--seconds", type=common.float_flag(1), default=None, help="length of the timed train.py run "
                    f"(--max-time: start-up and compilation included; default: the train step's share of --budget "
                    f"less {GPU_TRAIN_STARTUP} s)")
    gp.add_argument("--recipe-tokens", type=common.size_flag, default=2_000_000, help="training tokens per recipe run")
    gp.add_argument("--budget", type=common.float_flag(10), default=GPU_BUDGET, help="seconds for the whole check, "
                    "shared among the steps (" + ", ".join(f"{n} {s}" for n, s in GPU_STEP_SECONDS.items()) +
                    f" at {GPU_BUDGET}); a step that ends early leaves its time to the later ones")
    gp.add_argument("--skip", default="", metavar="STEP,...", help="steps to leave out: " + ", ".join(GPU_STEPS))
    gp.add_argument("--workdir", default=None, help="keep the tokenizer, data, runs and logs here (default: a "
                    "temp dir)")
    gp.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # the suite's dry run
    common.add_output_flags(gp, "write every step's figures as JSON (rewritten after each step)")


def _add_serve_parser(sub):
    sv = sub.add_parser("serve", help="serve.py under load: one stream vs 8 concurrent, time to first token, and "
                        "the server's decode against generate.py's for one stream",
                        description="Starts serve.py on int4 .bin exports of the given presets (random weights: "
                        "speed does not depend on them; a context of at least 2,112 tokens, for the long prompt) and "
                        "measures, through its HTTP API: decode tokens/s of one stream and the aggregate of --streams "
                        "concurrent ones (also with --deterministic), the time to first token of a 32-token prompt, "
                        "one stream's decode time against generate.py's decode loop (engine.generate_stream) on the "
                        "same file, interleaved, and a 2,000-token prompt arriving while 4 streams decode: their p99 "
                        "inter-token gap against their median alone, its time to first token prefilled in chunks "
                        "against in one piece.")
    sv.add_argument("--configs", default="tiny,small", help="presets to export and serve (comma-separated)")
    sv.add_argument("--strategy", default="int4", help="quantize.py --strategy of the served files")
    sv.add_argument("--streams", type=common.int_flag(2), default=8, help="concurrent streams")
    sv.add_argument("--tokens", type=common.int_flag(1), default=64, help="tokens decoded per stream")
    sv.add_argument("--repeat", type=common.int_flag(1), default=3, help="timed runs per figure (median)")
    common.add_device_flag(sv)
    common.add_output_flags(sv)


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(description="FishAI benchmarks: self-test (correctness + speed vs transformers), "
                          "full (bits/byte, perplexity, generation quality), data (prepare throughput) and "
                          "recipe (AdamW + cosine vs the default training recipe).",
                          epilog="usage examples:" + __doc__.split("Usage:")[1].split("Scoring conventions")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=common.ArgumentParser)
    _add_self_test_parser(sub)
    _add_full_parser(sub)
    _add_data_parser(sub)
    _add_recipe_parser(sub)
    _add_gpu_parser(sub)
    _add_serve_parser(sub)
    return p


try:  # tqdm is a hard dependency of the project, but keep the scoring core importable without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


class BenchmarkError(scoring.ScoringError):
    """Bad input for a benchmark command (model spec, flag, dataset); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# `full`: perplexity on the standard datasets + generation quality

# fixed prompts: the same for every model and run, so generation numbers compare across checkpoints
GEN_PROMPTS = [
    "The history of the city began",
    "In computer science, a hash table is",
    "Once upon a time, there was a little girl who",
    "The most important thing to remember about cooking rice is",
    "Scientists have discovered that",
    "从前有一座山，山里有一座庙，",
    "人工智能是",
    "今天的天气很好，我们",
]


def distinct_n(samples: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over the samples (Li et al., 2016)."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sample: list[int], n: int = 4) -> float:
    """Share of a sample's n-grams that repeat an earlier n-gram of the same sample (seq-rep-n)."""
    grams = [tuple(sample[i:i + n]) for i in range(len(sample) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def generation_quality(lm: scoring.LM, prompts=None, samples_per_prompt: int = 2, max_new_tokens: int = 64,
                       temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                       seed: int = 1234, progress: bool = True) -> dict:
    """Sample each fixed prompt at a fixed seed and measure diversity / degeneration.

    distinct-1/2 on the model's tokens pooled over all samples; repetition_rate = mean seq-rep-4;
    mean_length in new tokens; eos_rate = share of samples that ended with EOS."""
    prompts = list(GEN_PROMPTS if prompts is None else prompts)
    rows, token_samples = [], []
    jobs = [(p, k) for p in prompts for k in range(samples_per_prompt)]
    it = jobs
    if progress and tqdm is not None:
        it = tqdm(jobs, desc="generating", unit="sample", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for i, (prompt, k) in enumerate(it):
        ids, ended = lm.generate_ids(lm.encode(prompt), max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed + i)
        token_samples.append(ids)
        rows.append({"prompt": prompt, "sample": k, "text": lm.decode(ids), "tokens": len(ids),
                     "ended_with_eos": ended})
    seconds = time.perf_counter() - t0
    n = max(1, len(rows))
    return {
        "distinct_1": distinct_n(token_samples, 1),
        "distinct_2": distinct_n(token_samples, 2),
        "repetition_rate": sum(repetition_rate(s) for s in token_samples) / n,
        "mean_length": sum(len(s) for s in token_samples) / n,
        "eos_rate": sum(r["ended_with_eos"] for r in rows) / n,
        "n": len(rows),
        "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                     "top_p": top_p, "seed": seed, "samples_per_prompt": samples_per_prompt},
        "seconds": round(seconds, 3),
        "samples": rows,
    }


def _ppl_markdown(results: dict) -> list[str]:
    out = ["## Bits per byte and perplexity", "",
           "PPL is per word for spaced text and per character (char) for text without spaces between words.", "",
           "| dataset | bits/byte | PPL | per | token PPL | tokens | chars/token | words | chars | bytes |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        value, per = scoring.headline_ppl(r)
        out.append(f"| {scoring.DATASET_LABELS.get(name, name)} | {r['bits_per_byte']:.4f} | {scoring.fmt_ppl(value)} | {per} | "
                   f"{scoring.fmt_ppl(r['token_ppl'])} | {r['tokens']:,} | {r['chars_per_token']:.2f} | {r['words']:,} | "
                   f"{r['chars']:,} | {r['bytes']:,} |")
    return out + [""]


def _generation_markdown(g: dict) -> list[str]:
    st = g["settings"]
    out = ["", "## Generation quality", "",
           f"{g['n']} samples ({st['samples_per_prompt']} per prompt), {st['max_new_tokens']} new tokens max, "
           f"temperature {st['temperature']}, top-k {st['top_k']}, seed {st['seed']}.", "",
           "| distinct-1 | distinct-2 | repetition (seq-rep-4) | mean length | ends with EOS |",
           "|---:|---:|---:|---:|---:|",
           f"| {g['distinct_1']:.3f} | {g['distinct_2']:.3f} | {g['repetition_rate']:.3f} | "
           f"{g['mean_length']:.1f} | {g['eos_rate']:.0%} |", "", "### Samples", ""]
    for r in g["samples"]:
        text = r["text"].replace("\n", " ").strip()
        out.append(f"- **{r['prompt']}** → {text}{' ⟨EOS⟩' if r['ended_with_eos'] else ''}")
    return out


def full_report_markdown(res: dict) -> str:
    """The `full` results as a markdown report."""
    s = res["settings"]
    out = [f"# FishAI benchmark: {res['model']}", "",
           f"- date: {res['date']}; device: {s['device']}; dtype: {s['dtype'] or 'model default'}",
           f"- context: {s['max_seq_len']} tokens; stride: {s['stride']} "
           f"({'disjoint windows' if s['stride'] == s['max_seq_len'] else 'overlapping windows'}); "
           f"begin token id {s['begin_id']}", ""]
    if res["perplexity"]:
        out += _ppl_markdown(res["perplexity"])
    for name, msg in res.get("errors", {}).items():
        out.append(f"- {name}: not scored: {msg}")
    if res.get("generation"):
        out += _generation_markdown(res["generation"])
    return "\n".join(out) + "\n"


def score_datasets(lm: scoring.LM, datasets: dict, stride: int, batch_size: int, progress: bool) -> dict:
    """{name: documents} -> {name: perplexity() dict}, one console line per dataset."""
    results = {}
    for name, docs in datasets.items():
        results[name] = scoring.perplexity(lm, docs, stride=stride, batch_size=batch_size, progress=progress)
        print(scoring.describe_ppl(scoring.DATASET_LABELS.get(name, name), results[name]), flush=True)
    return results


def _print_full_summary(res: dict, samples_per_prompt: int, show_samples: bool = True) -> None:
    s = res["settings"]
    print()
    if res["perplexity"]:
        print(scoring.format_ppl_table(res["perplexity"], title=f"bits/byte and perplexity (stride {s['stride']}, "
                                                        f"context {s['max_seq_len']})"))
    gen = res["generation"]
    if gen:
        print(f"\ngeneration ({gen['n']} samples): distinct-1 {gen['distinct_1']:.3f}  distinct-2 "
              f"{gen['distinct_2']:.3f}  repetition {gen['repetition_rate']:.3f}  mean length "
              f"{gen['mean_length']:.1f}  ends with EOS {gen['eos_rate']:.0%}")
        for r in gen["samples"][::max(1, samples_per_prompt)][:4 if show_samples else 0]:
            print(f"  {r['prompt']!r} -> {r['text'][:100]!r}")


def run_full(args) -> int:
    specs = scoring.parse_data_flags(args)
    common.check_plan(*output_plan(args), args.overwrite)
    lm = scoring.load_lm(args.model, device=args.device, dtype=args.dtype, hf=args.hf, max_seq_len=args.max_seq_len,
                 dequantize=args.dequantize)
    stride = args.stride or lm.max_seq_len
    scoring._check_stride(stride, lm.max_seq_len)
    print(f"model: {lm.name} ({lm.kind}, context {lm.max_seq_len}, vocab {lm.vocab_size}) on {lm.device}")
    errors: dict = {}
    datasets = scoring.load_datasets(specs, split=args.split, limit=args.limit, errors=errors,
                             max_chars=args.max_chars, detokenize=args.detokenize)
    for msg in errors.values():
        print(f"error: {msg}", file=sys.stderr)
    results = score_datasets(lm, datasets, stride, args.batch_size, progress=not args.quiet)
    gen = None
    if not args.no_generation:
        gen = generation_quality(lm, samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k or None, seed=args.seed,
                                 progress=not args.quiet)
    res = {
        "model": str(args.model),
        "kind": lm.kind,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"device": lm.device, "dtype": args.dtype, "max_seq_len": lm.max_seq_len, "stride": stride,
                     "batch_size": args.batch_size, "split": args.split, "limit": args.limit,
                     "max_chars": args.max_chars, "detokenize": args.detokenize,
                     "begin_id": lm.begin_id, "datasets": {n: p for n, p in specs}},
        "perplexity": results,
        "errors": errors,
        "generation": gen,
    }
    _print_full_summary(res, args.samples, show_samples=not args.quiet)
    common.write_outputs(args, res, full_report_markdown)
    return common.EXIT_FAILED if errors else common.EXIT_OK


# ----------------------------------------------------------------------------------------------
# `self-test`: correctness checks + speed side by side with transformers.LlamaForCausalLM.
# A check is a function of the SelfTest that records pass/fail rows (SelfTest.check); a timing is a
# function that records speed rows (SelfTest.row). self_test() runs CHECKS, then the SPEED_BY_GROUP
# timings (--only): to add a row, write one small function and append it to its list.

def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _exc_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _median(xs) -> float:
    """The middle value (the upper one of an even count): every repeated timing reports it."""
    return sorted(xs)[len(xs) // 2]


def _dtype_str(dtype) -> str:
    return str(dtype).replace("torch.", "")


def peak_memory(device, fn) -> int | None:
    """Peak memory while fn() runs, in bytes: CUDA max_memory_allocated, or on CPU the process'
    peak RSS (VmHWM, reset through /proc/self/clear_refs, Linux); None where it cannot be measured."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


@dataclass
class SelfTest:
    """What the self-test steps share: the model and its HF twin, fixed random inputs, the settings,
    and the results so far."""
    cfg: Any                       # model.ModelConfig
    model: Any                     # model.GPT with random weights
    device: torch.device
    dtype: torch.dtype
    gen: torch.Generator           # every random input comes from it (reproducible with --seed)
    seq_len: int
    batch_size: int
    prompt_len: int
    decode_tokens: int
    repeat: int
    clock: Callable[[], float]
    compile: bool = False
    quantized: bool = True         # time the .bin strategies too (--no-quantized: False)
    hf: Any = None                 # transformers.LlamaForCausalLM with the same weights (None: --no-hf)
    x: Any = None                  # (2, T) inputs and targets of the loss and training checks
    y: Any = None
    seq: Any = None                # (2, prefill_len + a few) tokens of the KV-cache and HF checks
    prefill_len: int = 0
    full_logits: Any = None        # the model's logits on seq in one full forward
    checks: list = field(default_factory=list)
    speed: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def randint(self, *shape) -> torch.Tensor:
        return torch.randint(0, self.cfg.vocab_size, shape, generator=self.gen).to(self.device)

    def check(self, name: str, passed, detail: str, required: bool = True):
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail, "required": required})
        mark = "PASS" if passed else ("FAIL" if required else "WARN")
        print(f"[{mark}] {name}: {detail}", flush=True)

    def row(self, key: str, label: str, ours, theirs, unit: str, peer: str = "HF LlamaForCausalLM"):
        """One result row; `theirs` (JSON key "hf") is the figure of `peer`."""
        ratio = (ours / theirs) if (ours is not None and theirs) else None
        self.speed[key] = {"label": label, "ours": ours, "hf": theirs, "ratio": ratio, "unit": unit, "peer": peer}

    def hf_generate(self, idx, n: int, **kw):
        return self.hf.generate(idx, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(idx), **kw)

    def time_pair(self, fn_ours, fn_hf, warmup: int = 1) -> tuple[float, float | None]:
        """Median seconds of fn_ours and fn_hf (None without HF), run interleaved (ours, HF, ours,
        HF, ...) so that both see the same machine load."""
        t_o, t_h = self.time_runs([fn_ours, fn_hf if self.hf is not None else None], warmup)
        return t_o, t_h

    def time_runs(self, fns: list, warmup: int = 1) -> list[float | None]:
        """Median seconds of each function (None for a None entry), run interleaved; a function that
        returns a PeerRun is timed by the seconds it reports."""
        live = [fn for fn in fns if fn is not None]
        for fn in live:
            for _ in range(warmup):
                fn()
        times: list[list[float]] = [[] for _ in live]
        for _ in range(max(1, self.repeat)):
            for k, fn in enumerate(live):
                _sync(self.device)
                t0 = self.clock()
                out = fn()
                _sync(self.device)
                # a peer in a child process timed itself: this process's CPU clock never saw its work
                times[k].append(out.seconds if isinstance(out, PeerRun) else self.clock() - t0)
        med = iter(_median(t) for t in times)
        return [None if fn is None else next(med) for fn in fns]


# -- checks

def check_param_count(t: SelfTest):
    n, formula = t.model.num_params(), count_params(t.cfg)
    t.check("parameter count", n == formula,
            f"{n:,} parameters ({n / 1e6:.2f}M, tied embedding counted once; formula {formula:,})")


def check_init_loss(t: SelfTest):
    """Near-uniform predictions at init: cross-entropy close to ln(vocab)."""
    t.model.eval()
    with torch.no_grad():
        _, loss = t.model(t.x, t.y)
    V = t.cfg.vocab_size
    t.check("loss at init ~ ln(vocab)", abs(float(loss) - math.log(V)) < 0.5,
            f"{float(loss):.4f} vs ln({V}) = {math.log(V):.4f}")


def check_kv_cache(t: SelfTest):
    """The engine's prefill + one-token decode steps, and its static step (the compiled path's math,
    run eagerly), give the same logits as one full forward."""
    P, S = t.prefill_len, t.seq.shape[1] - t.prefill_len
    with torch.inference_mode():
        for static in (False, True):
            eng = engine.Engine(t.model, 2, P + S)
            outs = [eng.step(t.seq[:, :P], 0, last_only=False)]
            step = (lambda tok, i: eng._static(tok, torch.full((2,), i, device=t.device))) if static else eng.step
            outs += [step(t.seq[:, i:i + 1], i)[:, None] for i in range(P, P + S)]
            err = float((torch.cat(outs, dim=1) - t.full_logits).abs().max())
            t.check(f"KV cache ({'static' if static else 'dynamic'}) = full forward", err < 1e-3,
                    f"max |logit diff| {err:.2e} over {P}-token prefill + {S} decode steps")


def check_hf_logits(t: SelfTest):
    if t.hf is None:
        return
    with torch.inference_mode():
        ref = t.hf(input_ids=t.seq).logits.float()
    err = float((ref - t.full_logits).abs().max())
    t.check("same logits as transformers LlamaForCausalLM", err < 1e-3, f"max |logit diff| {err:.2e}")


def check_hf_greedy(t: SelfTest):
    if t.hf is None:
        return
    prompt = t.seq[:1, :t.prefill_len]
    with torch.inference_mode():
        ours, theirs = engine.generate(t.model, prompt, 16, temperature=0), t.hf_generate(prompt, 16)
    same = torch.equal(ours.cpu(), theirs.cpu())
    P = t.prefill_len
    t.check("greedy decode = LlamaForCausalLM.generate", same,
            "16 tokens identical" if same else f"ours {ours[0, P:].tolist()} vs HF {theirs[0, P:].tolist()}")


def check_forward_backward(t: SelfTest):
    """Forward/backward in the run dtype (autocast): a finite loss close to fp32's, finite gradients."""
    t.model.train()
    with torch.no_grad():
        _, ref_loss = t.model(t.x, t.y)
    with common.autocast(t.device, t.dtype):
        _, loss = t.model(t.x, t.y)
    loss.backward()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in t.model.parameters())
    loss = loss.detach()
    ok = bool(torch.isfinite(loss)) and grads_ok and abs(float(loss) - float(ref_loss)) < 0.05 * float(ref_loss)
    t.check(f"forward/backward ({_dtype_str(t.dtype)})", ok,
            f"loss {float(loss):.4f} (fp32 {float(ref_loss):.4f}), gradients {'finite' if grads_ok else 'NOT finite'}")
    t.model.zero_grad(set_to_none=True)


def check_training_lowers_loss(t: SelfTest):
    """A few optimizer steps on one batch must lower its loss (on a copy: the timed model stays as built)."""
    probe = GPT(t.cfg).to(t.device)
    probe.load_state_dict(t.model.state_dict())
    opt = configure_optimizers(probe, lr=3e-3, device_type=t.device.type)
    losses = []
    for _ in range(5):
        with common.autocast(t.device, t.dtype):
            _, loss = probe(t.x, t.y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    t.check("training steps lower the loss", losses[-1] < losses[0] - 0.05, " -> ".join(f"{v:.3f}" for v in losses))


def check_compile(t: SelfTest):
    """torch.compile gives eager's loss (the training timing compiles its own copy: train.step_runner)."""
    if not t.compile:
        return
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(t.model)
        with torch.no_grad(), common.autocast(t.device, t.dtype):
            _, lc = compiled(t.x, t.y)
            _, le = t.model(t.x, t.y)
        err = abs(float(lc) - float(le))
        t.check("torch.compile = eager", err < 1e-2 * max(1.0, float(le)),
                f"loss {float(lc):.4f} vs eager {float(le):.4f} (compile {time.perf_counter() - t0:.1f}s)")
    except Exception as e:  # a missing compiler toolchain is a failed check, not a crash
        t.check("torch.compile = eager", False, _exc_line(e))


CHECKS = [check_param_count, check_init_loss, check_kv_cache, check_hf_logits, check_hf_greedy,
          check_forward_backward, check_training_lowers_loss, check_compile]


# -- timings (run under autocast in the run dtype)

def _greedy_full_recompute(model, idx, n):
    """Decode without a KV cache: the whole sequence is re-run through the model for every token
    (only the last position goes through the output layer, as HF generate(use_cache=False) does)."""
    with torch.inference_mode():
        for _ in range(n):
            logits = model._head(model._hidden(idx)[:, -1]) if hasattr(model, "_hidden") else model(idx)[0][:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def time_prefill(t: SelfTest):
    n = max(1, min(t.seq_len, t.cfg.max_seq_len - 1))
    idx = t.randint(1, n)
    t_o, t_h = t.time_pair(lambda: engine.generate(t.model, idx, 1, temperature=0), lambda: t.hf_generate(idx, 1))
    t.row("prefill_tok_s", f"prefill tokens/s (batch 1, {n} tokens)", n / t_o, n / t_h if t_h else None, "tok/s")


def time_decode(t: SelfTest, batch: int, cache: bool):
    idx, N = t.randint(batch, t.prompt_len), t.decode_tokens
    if cache:
        t_o, t_h = t.time_pair(lambda: engine.generate(t.model, idx, N, temperature=0), lambda: t.hf_generate(idx, N))
    else:
        t_o, t_h = t.time_pair(lambda: _greedy_full_recompute(t.model, idx, N),
                               lambda: t.hf_generate(idx, N, use_cache=False))
    t.row(f"decode_b{batch}_{'' if cache else 'nocache_'}tok_s",
          f"decode tokens/s (batch {batch}, {'KV' if cache else 'no'} cache, {t.prompt_len}+{N} tokens)",
          batch * N / t_o, batch * N / t_h if t_h else None, "tok/s")


class HFTrainAdapter(torch.nn.Module):
    """transformers' LlamaForCausalLM behind GPT's training interface - forward(idx, targets) ->
    (None, mean loss), the tied embedding named tok_emb - so that train.py's own train_step (Muon for
    the matrices, AdamW for the embedding and norms, by parameter name) trains it: the same loop for
    both models."""

    def __init__(self, hf):
        super().__init__()
        self.tok_emb = hf.model.embed_tokens  # registered first, so this name wins in named_parameters
        self.hf = hf

    def forward(self, idx, targets=None, loss_mask=None, doc_ids=None):
        logits = self.hf(input_ids=idx).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return None, loss


def _train_steps(t: SelfTest, xb, yb):
    """The real training step (train.step_runner: train_step with the recipe's Muon + AdamW groups,
    clipping, autocast in the run dtype, torch.compile with --compile) for a copy of ours and for HF
    (None without) through the same train_step."""
    args = train.make_args(batch_size=t.batch_size, grad_accum=1, seq_len=t.seq_len, max_steps=10_000,
                           compile=t.compile, dtype=common.dtype_name(str(t.dtype)))
    train.apply_recipe(args, t.cfg)
    ours = GPT(t.cfg).to(t.device)
    ours.load_state_dict(t.model.state_dict())
    step_ours = train.step_runner(ours, args, t.device, t.dtype, [(xb, yb)])
    if t.hf is None:
        return step_ours, None
    hf = to_hf(ours).to(t.device)
    return step_ours, train.step_runner(HFTrainAdapter(hf), args, t.device, t.dtype, [(xb, yb)])


def _peak_mb(t: SelfTest, step) -> float | None:
    """Peak memory of one training step with its optimizer state already allocated."""
    if step is None:
        return None
    step()
    peak = peak_memory(t.device, step)
    return peak / 2**20 if peak else None


def time_train(t: SelfTest):
    xb, yb = t.randint(t.batch_size, t.seq_len), t.randint(t.batch_size, t.seq_len)
    step_ours, step_hf = _train_steps(t, xb, yb)
    mem_o, mem_h = _peak_mb(t, step_ours), _peak_mb(t, step_hf)
    t_o, t_h = t.time_pair(step_ours, step_hf, warmup=2 if t.compile else 0)
    tok = t.batch_size * t.seq_len
    t.row("train_tok_s", f"training step tokens/s (batch {t.batch_size} x {t.seq_len}, train.train_step: Muon)",
          tok / t_o, tok / t_h if t_h else None, "tok/s", peer="HF LlamaForCausalLM in the same train_step")
    peak = device_peak_flops(t.device, t.dtype)
    if peak:
        t.row("train_mfu", "training MFU", estimate_mfu(tok / t_o, t.cfg, t.seq_len, peak),
              estimate_mfu(tok / t_h, t.cfg, t.seq_len, peak) if t_h else None, "fraction",
              peer="HF LlamaForCausalLM in the same train_step")
    t.row("train_peak_mem_mb", f"training peak memory MB ({'CUDA allocated' if t.cuda else 'process peak RSS'})",
          mem_o, mem_h, "MB")
    _time_train_parts(t, step_ours.trainer, xb, yb)


def _time_train_parts(t: SelfTest, run, xb, yb) -> None:
    """Where our training step's time goes: forward + backward (through the compiled model with
    --compile) and the optimizer step (Muon + AdamW), timed apart."""
    def fwd_bwd():
        with common.autocast(t.device, t.dtype):
            _, loss = run.model(xb, yb)
        loss.backward()

    t_fb, t_opt = t.time_runs([fwd_bwd, run.optimizer.step])
    run.optimizer.zero_grad(set_to_none=True)
    for key, label, secs in (("train_fwd_bwd_ms", "training step part: forward + backward, ms", t_fb),
                             ("train_optimizer_ms", "training step part: optimizer step (Muon + AdamW), ms", t_opt)):
        t.row(key, label, secs * 1e3, None, "ms", peer="-")


def time_compiled_decode(t: SelfTest):
    """The engine's compiled step (compile=True): a static-shape decode step (attention over the whole
    cache with a mask), compiled and on CUDA replayed as a CUDA graph - what generate.py, evaluate.py
    and benchmark.py decode with on CUDA. Checked against the eager step, teacher-forced; timed
    against HF's fastest generate (static cache, which transformers compiles on CUDA)."""
    if not t.compile:
        return
    P, N = t.prompt_len, t.decode_tokens
    name = "compiled decode step = eager step (teacher-forced logits)"
    t0 = time.perf_counter()
    try:
        seq = t.randint(1, P + N)
        ok, detail = scoring.check_decode_paths_agree(t.model, seq, P, t.dtype)
        t.check(name, ok, f"{detail} (build {time.perf_counter() - t0:.1f}s)")
        idx = seq[:, :P]
        path = engine.engine_for(t.model, 1, compile=True).path
        hf = (lambda: t.hf_generate(idx, N, cache_implementation="static")) if t.hf is not None else None
        t_o, t_h = t.time_pair(lambda: engine.generate(t.model, idx, N, temperature=0, compile=True), hf, warmup=2)
        t.row("decode_b1_compiled_tok_s", f"decode tokens/s (batch 1, {path}, {P}+{N} tokens)",
              N / t_o, N / t_h if t_h else None, "tok/s", peer="HF generate, static cache (+ its torch.compile on CUDA)")
    except Exception as e:  # no compiler toolchain: report, do not crash the run
        t.check(name, False, _exc_line(e))
    finally:
        engine.release(t.model)


# -- quantized: the same weights exported as .bin strategies and loaded as load_model loads them
# (int8/int4 kernels), against HF fp32 and llama.cpp running quantize.py's GGUF export of them

# run in a fresh process: in the self-test's own, freed memory is reused and RSS says little
_RSS_AT_LOAD = """\
import os, sys
sys.path.insert(0, sys.argv[3])
import model, quantize
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
m = model.load_model(sys.argv[1], device=sys.argv[2])
print(before, rss())
"""


def _rss_growth_at_load(path, device) -> int | None:
    """Resident memory that load_model(path) adds to a fresh Python process that has imported torch
    and model.py (Linux /proc), None elsewhere."""
    r = subprocess.run([sys.executable, "-c", _RSS_AT_LOAD, str(path), str(device), str(Path(__file__).parent)],
                       capture_output=True, text=True)
    try:
        before, after = map(int, r.stdout.split()[-2:])
    except ValueError:
        return None
    return after - before


class LlamaCppDecoder:
    """llama.cpp (llama-cpp-python, low-level API) decoding a batch of sequences greedily, one
    llama_decode for all rows per step (as generate() does): the same prompt ids as ours, the same
    number of threads. The self-test's random model has no tokenizer, so llama.cpp is told the
    vocabulary is "none" (a GGUF with a tokenizer loads as it is)."""

    def __init__(self, gguf_path, batch: int, length: int, threads: int, has_vocab: bool):
        import llama_cpp
        from llama_cpp import _internals
        overrides = None if has_vocab else {"tokenizer.ggml.model": "none"}
        self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                                   kv_overrides=overrides, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = -(-batch * length // 256) * 256
        params.n_batch = params.n_ubatch = max(batch * length, 8)
        params.n_seq_max, params.n_threads, params.n_threads_batch = batch, threads, threads
        self.ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=batch, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _step(self, rows: list[list[int]], start: int) -> list[int]:
        """Decode rows[s] at positions start.. for every sequence s; the argmax after each."""
        b, n = self.batch.batch, len(rows[0])
        b.n_tokens = len(rows) * n
        for s, ids in enumerate(rows):
            for i, tok in enumerate(ids):
                j = s * n + i
                b.token[j], b.pos[j], b.seq_id[j][0], b.n_seq_id[j], b.logits[j] = tok, start + i, s, 1, i == n - 1
        self.ctx.decode(self.batch)
        return [int(np.ctypeslib.as_array(self.ctx.get_logits_ith(s * n + n - 1), shape=(self.n_vocab,)).argmax())
                for s in range(len(rows))]

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        self.ctx.kv_cache_clear()
        nxt = self._step(prompts, 0)
        out = [[t] for t in nxt]
        for i in range(n - 1):
            nxt = self._step([[t] for t in nxt], len(prompts[0]) + i)
            for row, t in zip(out, nxt):
                row.append(t)
        return out

    def close(self):
        self.batch.close()
        self.ctx.close()
        self.llm.close()


class PeerFailed(RuntimeError):
    """A peer could not give a figure: its llama.cpp rows fail (a non-required check), ours go on."""


class PeerCrashed(PeerFailed):
    """A peer's native code killed its process (llama.cpp's AMX kernel: SIGSEGV on some CPUs)."""


class PeerMeasuredNothing(PeerFailed):
    """A peer's run did not do the work asked (fewer tokens) or took no measurable time: a rate
    from it would be absurd (a parent's CPU clock once gave llama.cpp 113,978 tok/s)."""


@dataclass
class PeerRun:
    """One peer run as the peer's own process measured it: the tokens it generated and the seconds
    it took by the self-test's clock. Its work happens in a child process, which the parent's CPU
    clock (--clock cpu: time.process_time) does not see, so the child times itself."""
    tokens: list
    seconds: float


# below this a "decode" of a token measured nothing (a llama.cpp step is tens of microseconds at least)
MIN_PEER_SECONDS_PER_TOKEN = 1e-6


def peer_run(reply: dict, batch: int, n: int, clock: str) -> PeerRun:
    """A peer child's reply to "decode batch x n tokens", checked before it may become a rate."""
    tokens, seconds = reply.get("tokens"), reply.get("seconds")
    if not isinstance(tokens, list) or len(tokens) != batch or any(not isinstance(r, list) or len(r) != n
                                                                   for r in tokens):
        got = sum(len(r) for r in tokens if isinstance(r, list)) if isinstance(tokens, list) else 0
        raise PeerMeasuredNothing(f"llama.cpp returned {got} tokens for {batch} x {n}: no rate from a run that "
                                  "did not do the work")
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or \
            seconds < batch * n * MIN_PEER_SECONDS_PER_TOKEN:
        raise PeerMeasuredNothing(f"llama.cpp measured {seconds} s ({clock} clock, in its own process) for "
                                  f"{batch} x {n} tokens: no time measured, so no rate")
    return PeerRun(tokens, float(seconds))


# the child that runs llama.cpp: one LlamaCppDecoder per batch size, a JSON request a line; it times
# each run itself with the self-test's clock (its own process CPU time for --clock cpu)
LLAMA_WORKER = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
from benchmark import LlamaCppDecoder
decoders = {b: LlamaCppDecoder(cfg["gguf"], b, cfg["length"], cfg["threads"], cfg["has_vocab"]) for b in cfg["batches"]}
clock = time.process_time if cfg["clock"] == "cpu" else time.perf_counter
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = clock()
    tokens = decoders[len(req["prompts"])].generate(req["prompts"], req["n"])
    print(json.dumps({"tokens": tokens, "seconds": clock() - t0}), flush=True)
"""


class LlamaCppPeer:
    """llama.cpp in a child process, so that a native crash (llama.cpp's AMX kernel dies with
    SIGSEGV on some CPUs, ggml-org/llama.cpp issue 20824) fails the llama.cpp rows with its reason
    instead of taking the whole self-test (and its JSON) down."""

    def __init__(self, gguf, batches, length: int, threads: int, has_vocab: bool, worker: str = LLAMA_WORKER,
                 clock: str = "wall"):
        self.clock = clock  # "wall" or "cpu": the child times its own runs with it
        cfg = {"root": str(Path(__file__).resolve().parent), "gguf": str(gguf), "batches": list(batches),
               "length": length, "threads": threads, "has_vocab": has_vocab, "clock": clock}
        self.proc = subprocess.Popen([sys.executable, "-c", worker, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline()
        if line:
            return line
        rc = self.proc.wait(timeout=60)
        name = signal.Signals(-rc).name if rc < 0 else f"exit {rc}"
        tail = (self.proc.stderr.read() or "").strip().splitlines()[-1:] or [""]
        raise PeerCrashed(f"llama.cpp crashed ({name}) before {what}" + (f": {tail[0][:160]}" if tail[0] else "") +
                          ("; on CPUs with AMX its quantized kernel does: build llama-cpp-python without AMX "
                           "(README, 'llama.cpp')" if rc == -signal.SIGSEGV else ""))

    def generate(self, prompts: list[list[int]], n: int) -> PeerRun:
        try:
            self.proc.stdin.write(json.dumps({"prompts": prompts, "n": n}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: _expect says how
        reply = self._expect(f"decoding {len(prompts)} x {n} tokens")
        try:
            reply = json.loads(reply)
        except ValueError:
            raise PeerMeasuredNothing(f"llama.cpp answered {reply.strip()[:80]!r}, not a timed run") from None
        return peer_run(reply if isinstance(reply, dict) else {}, len(prompts), n, self.clock)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)


# our .bin strategy -> (the GGUF strategy of the same bit width, llama.cpp's name for it)
QUANT_PEERS = {"fp16": ("fp16", "F16"), "int8": ("int8", "Q8_0"), "int4": ("int4", "Q4_0"),
               "mixed": ("mixed", "Q4_0+Q8_0+F16")}


def _quantize_cli(ckpt: Path, out: Path, strategy: str, fmt: str = "bin") -> int:
    """Export `ckpt` with the quantize.py command a user runs (a child process, as the user would);
    returns the file's size."""
    cmd = [sys.executable, str(Path(__file__).with_name("quantize.py")), "--model", str(ckpt), "--output", str(out),
           "--strategy", strategy, "--format", fmt, "--quiet", "--overwrite"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchmarkError(f"quantize.py --strategy {strategy} --format {fmt} failed: "
                             f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}")
    return out.stat().st_size


def _llama_cpp_peer(t: SelfTest, ckpt: Path, strategy: str) -> LlamaCppPeer | None:
    """llama.cpp (in its own process) on the GGUF export of t.model at the bit width of `strategy`;
    None without llama-cpp-python or on a GPU run (the comparison is a CPU one)."""
    if t.cuda or importlib.util.find_spec("llama_cpp") is None:
        return None
    path = ckpt.with_name(f"{strategy}.gguf")
    _quantize_cli(ckpt, path, QUANT_PEERS[strategy][0], fmt="gguf")
    return LlamaCppPeer(path, (1, 8), t.prompt_len + t.decode_tokens, torch.get_num_threads(),
                        t.model.tokenizer is not None, clock="cpu" if t.clock is time.process_time else "wall")


def _quantized_model(t: SelfTest, ckpt: Path, strategy: str):
    """t.model's weights as a .bin of `strategy`, loaded quantized; rows for its memory."""
    path = ckpt.with_name(f"{strategy}.bin")
    size = _quantize_cli(ckpt, path, strategy)
    qm = load_model(path, device=t.device, dtype=t.dtype)  # bf16 activations on CUDA, fp32 on CPU
    t.row(f"quant_{strategy}_model_mb", f"{strategy} .bin: parameters + buffers MB vs the file",
          model_bytes(qm) / 2**20, size / 2**20, "MB", peer=".bin file")
    grown = None if t.cuda else _rss_growth_at_load(path, t.device)
    t.row(f"quant_{strategy}_rss_mb", f"{strategy} .bin: RSS a fresh process gains at load, MB",
          grown / 2**20 if grown is not None else None, size / 2**20, "MB", peer=".bin file")
    return qm


def _time_quantized_batch(t: SelfTest, qm, strategy: str, batch: int, llama) -> None:
    """The rows of one batch size: the engine's eager step vs HF and llama.cpp, interleaved on the
    same prompt; with --compile on CUDA also its compiled CUDA-graph step vs HF."""
    idx, N = t.randint(batch, t.prompt_len), t.decode_tokens
    hf_name = "HF LlamaForCausalLM " + ("fp32" if t.dtype == torch.float32 else f"{_dtype_str(t.dtype)} autocast")
    t_q, t_h, t_l = t.time_runs([lambda: engine.generate(qm, idx, N, temperature=0),
                                 (lambda: t.hf_generate(idx, N)) if t.hf is not None else None,
                                 (lambda: llama.generate(idx.tolist(), N)) if llama else None])
    label = f"{strategy} .bin: decode tokens/s (batch {batch}, {t.prompt_len}+{N} tokens)"
    t.row(f"quant_{strategy}_b{batch}_tok_s", label, batch * N / t_q, batch * N / t_h if t_h else None,
          "tok/s", peer=hf_name)
    if t_l:
        t.row(f"quant_{strategy}_b{batch}_llama_cpp_tok_s", label, batch * N / t_q, batch * N / t_l, "tok/s",
              peer=f"llama.cpp {QUANT_PEERS[strategy][1]}")
    if t.compile and (batch == 1 or not t.cuda):  # (on CUDA batch 8 too would double the self-test's compile time)
        start = time.perf_counter()
        path = engine.engine_for(qm, batch, compile=True).path  # starts from a fresh dynamo cache
        path += f", built in {time.perf_counter() - start:.0f} s"
        try:
            t_c, t_h, t_l = t.time_runs([lambda: engine.generate(qm, idx, N, temperature=0, compile=True),
                                         (lambda: t.hf_generate(idx, N)) if t.hf is not None else None,
                                         (lambda: llama.generate(idx.tolist(), N)) if llama else None])
        finally:
            engine.release(qm)
        t.row(f"quant_{strategy}_b{batch}_compiled_tok_s", f"{label}, {path}", batch * N / t_c,
              batch * N / t_h if t_h else None, "tok/s", peer=hf_name)
        if t_l:
            t.row(f"quant_{strategy}_b{batch}_compiled_llama_cpp_tok_s", f"{label}, {path}", batch * N / t_c,
                  batch * N / t_l, "tok/s", peer=f"llama.cpp {QUANT_PEERS[strategy][1]}")


def time_quantized(t: SelfTest, strategy: str):
    """Decode tokens/s at batch 1 and 8 of t.model's weights as a `strategy` .bin loaded quantized,
    against HF generate and llama.cpp (QUANT_PEERS) on the same prompt, interleaved."""
    if not t.quantized:
        return
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "model.pt"
        save_checkpoint(ckpt, t.model, tokenizer=t.model.tokenizer)
        qm = _quantized_model(t, ckpt, strategy)
        llama = None
        try:
            llama = _llama_cpp_peer(t, ckpt, strategy)
        except PeerFailed as e:
            t.check(f"llama.cpp runs the {strategy} GGUF", False, str(e), required=False)
        try:
            for batch in (1, 8):
                try:
                    _time_quantized_batch(t, qm, strategy, batch, llama)
                except PeerFailed as e:  # our rows were timed with it: again without the peer
                    t.check(f"llama.cpp runs the {strategy} GGUF", False, str(e), required=False)
                    llama.close()
                    llama = None
                    _time_quantized_batch(t, qm, strategy, batch, None)
        finally:
            if llama is not None:
                llama.close()


KERNEL_CALLS = 50  # matmuls per timed run of a kernel row (one call takes 10-1000 us)


def _kernel_pairs(w: torch.Tensor) -> dict:
    """(FishAI's layer, torch's layer, torch's op) per weight kind of the runtime, for one weight."""
    q8, q4 = quantize_rtn(w, "q8"), quantize_rtn(w, "q4")
    theirs16 = HalfLinear(w.half(), kernel=False)  # the runtime's layer without FishAI's kernels: cast per call
    return {"int8": (int8_linear(q8.codes, q8.scales, "cpu"), int8_linear(q8.codes, q8.scales, "cpu", kernel=True),
                     "_weight_int8pack_mm"),
            "int4": (int4_linear(q4, "cpu"),
                     int4_linear(q4, "cpu", mode=int4_mode("cpu", w.shape[0], q4.group_size, fishai=False)),
                     "_weight_int4pack_mm_for_cpu"),
            "fp16": (HalfLinear(w.half()), theirs16, "F.linear")}


def time_kernels(t: SelfTest):
    """Matmul calls/s of FishAI's CPU kernels (cpu_kernels) against torch's on the same stored
    weights, for each matmul of t.model as the runtime runs it (q/k/v and gate/up fused, o, down,
    the head) at batch 1 and 8, interleaved."""
    if t.cuda or not t.quantized:
        return
    if not cpu_kernels.available():
        t.check("FishAI's CPU kernels run here", False, cpu_kernels.why(), required=False)
        return
    c, g = t.model.config, torch.Generator().manual_seed(0)
    shapes = {"qkv": ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.d_model), "o": (c.d_model, c.n_heads * c.head_dim),
              "gate_up": (2 * c.d_ff, c.d_model), "down": (c.d_model, c.d_ff), "head": (c.vocab_size, c.d_model)}
    for name, (n, k) in shapes.items():
        pairs = _kernel_pairs(torch.randn(n, k, generator=g) * 0.02)
        for batch in (1, 8):
            x = torch.randn(batch, k, generator=g)
            for kind, (ours, theirs, op) in pairs.items():
                t_o, t_t = t.time_runs([lambda f=ours: [f(x) for _ in range(KERNEL_CALLS)],
                                        lambda f=theirs: [f(x) for _ in range(KERNEL_CALLS)]])
                t.row(f"kernel_{kind}_{name}_b{batch}_calls_s", f"{kind} {name} matmul ({n}x{k}), batch {batch}: calls/s",
                      KERNEL_CALLS / t_o, KERNEL_CALLS / t_t, "calls/s", peer=f"torch {op}")


SPEED_BY_GROUP = {
    "prefill": [time_prefill],
    "decode": [partial(time_decode, batch=b, cache=c) for c in (True, False) for b in (1, 8)],
    "train": [time_train],
    "compiled-decode": [time_compiled_decode],
    "quantized": [partial(time_quantized, strategy=s) for s in QUANT_PEERS],
    "kernels": [time_kernels],
}


# -- driver

def _build_self_test(config, device, dtype, compile, batch_size, seq_len, prompt_len, decode_tokens, repeat,
                     hf, seed, clock, quantized=True) -> SelfTest:
    """The model (random weights from `seed`), its HF twin, the fixed inputs and the settings."""
    if clock not in ("wall", "cpu"):
        raise BenchmarkError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    device = common.resolve_device(device)
    cuda = device.type == "cuda"
    cfg = get_config(config) if isinstance(config, str) else config
    decode_tokens = decode_tokens or (128 if cuda else 32)
    torch.manual_seed(seed)
    t = SelfTest(cfg=cfg, model=GPT(cfg).to(device), device=device,
                 dtype=common.resolve_dtype(dtype or "auto", device), gen=torch.Generator().manual_seed(seed),
                 seq_len=min(seq_len or (1024 if cuda else 256), cfg.max_seq_len),
                 batch_size=batch_size or (16 if cuda else 4), decode_tokens=decode_tokens,
                 prompt_len=max(1, min(prompt_len, cfg.max_seq_len - decode_tokens)), repeat=repeat,
                 # cpu: process CPU seconds instead of wall seconds - on a shared, oversubscribed
                 # machine the wall clock mostly measures the other processes; CPU time the work done
                 clock=time.process_time if clock == "cpu" and not cuda else time.perf_counter,
                 compile=bool(compile), quantized=bool(quantized))
    n = min(128, t.seq_len)
    t.x, t.y = t.randint(2, n), t.randint(2, n)
    t.prefill_len = min(16, cfg.max_seq_len // 2)
    t.seq = t.randint(2, t.prefill_len + min(8, cfg.max_seq_len // 4))
    t.model.eval()
    with torch.inference_mode():
        t.full_logits = t.model(t.seq)[0]
    if hf:
        t.hf = to_hf(t.model).to(device).eval()
        t.hf.generation_config.eos_token_id = None  # decode exactly N tokens, like ours
        t.hf.generation_config.pad_token_id = 0
    return t


def self_test(config="tiny", device="cpu", dtype=None, compile=False, batch_size=None, seq_len=None,
              prompt_len=32, decode_tokens=None, repeat=3, hf=True, seed=0, progress=True, clock="wall",
              quantized=True, only=None) -> dict:
    """Build the model from a preset and check it works here; measure speed vs LlamaForCausalLM.

    Returns {"checks": [...], "speed": {...}, "passed": bool, ...}; `passed` covers the required
    (correctness) checks only - speed figures are reported, never asserted."""
    t = _build_self_test(config, device, dtype, compile, batch_size, seq_len, prompt_len, decode_tokens, repeat,
                         hf, seed, clock, quantized)
    print(f"self-test: config {config if isinstance(config, str) else 'custom'} on {t.device}, dtype "
          f"{_dtype_str(t.dtype)}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for check in CHECKS:
        check(t)
    t.model.eval()
    timings = [fn for group in (only or SPEED_GROUPS) for fn in SPEED_BY_GROUP[group]]
    steps = tqdm(timings, desc="speed", unit="test", leave=False, dynamic_ncols=True) if (progress and tqdm) else timings
    with common.autocast(t.device, t.dtype):
        for timing in steps:
            timing(t)
    return {
        "config": config if isinstance(config, str) else "custom",
        "model_config": t.cfg.to_dict(),
        "params": t.model.num_params(),
        "device": str(t.device),
        "device_name": torch.cuda.get_device_name(t.device) if t.cuda else f"CPU ({os.cpu_count()} cores)",
        "dtype": _dtype_str(t.dtype),
        "compile": t.compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"seq_len": t.seq_len, "batch_size": t.batch_size, "prompt_len": t.prompt_len,
                     "decode_tokens": t.decode_tokens,
                     "clock": "process CPU time" if t.clock is time.process_time else "wall clock"},
        "checks": t.checks,
        "speed": t.speed,
        "passed": all(c["passed"] for c in t.checks if c["required"]),
    }


def _speed_cells(r: dict) -> tuple[str, str, str]:
    """One speed row's (FishAI, HF, ratio) cells, for the console table and the markdown report."""
    def f(v):
        if v is None:
            return "n/a"
        return f"{v:.1%}" if r["unit"] == "fraction" else f"{v:,.1f}"
    return f(r["ours"]), f(r["hf"]), (f"{r['ratio']:.2f}x" if r["ratio"] else "n/a")


def format_speed_table(speed: dict) -> str:
    """The console table: each row against its peer (HF LlamaForCausalLM unless the row names one)."""
    lines = [f"{'metric':<66}{'FishAI':>12}{'peer':>12}{'ratio':>8}  peer"]
    for r in speed.values():
        ours, hf, ratio = _speed_cells(r)
        lines.append(f"{r['label']:<66}{ours:>12}{hf:>12}{ratio:>8}  {r.get('peer', 'HF LlamaForCausalLM')}")
    return "\n".join(lines)


def self_test_markdown(res: dict) -> str:
    out = [f"## self-test: {res['config']} on {res['device_name']} ({res['dtype']}"
           f"{', torch.compile' if res['compile'] else ''})", "",
           f"{res['date']}, torch {res['torch']}, {res['threads']} threads, {res['params']:,} parameters, "
           f"timed by {res['settings'].get('clock', 'wall clock')} (median of interleaved runs).", "",
           "| check | result | detail |", "|---|---|---|"]
    for c in res["checks"]:
        detail = str(c["detail"]).replace("|", "\\|")  # "max |diff|" must not split the table cell
        out.append(f"| {c['name']} | {'pass' if c['passed'] else 'FAIL'} | {detail} |")
    out += ["", "| metric | FishAI | peer | ratio | peer is |", "|---|---:|---:|---:|---|"]
    for r in res["speed"].values():
        out.append(f"| {r['label']} | {' | '.join(_speed_cells(r))} | {r.get('peer', 'HF LlamaForCausalLM')} |")
    return "\n".join(out) + "\n"


def run_self_test(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    if args.config not in CONFIGS:
        raise BenchmarkError(f"--config {args.config!r}: choose one of {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    only = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else None
    bad = [g for g in only or () if g not in SPEED_GROUPS]
    if bad or only == []:
        raise BenchmarkError(f"--only {args.only}: choose from {', '.join(SPEED_GROUPS)}")
    res = self_test(args.config, device=args.device, dtype=args.dtype, compile=args.compile,
                    batch_size=args.batch_size, seq_len=args.seq_len, prompt_len=args.prompt_len,
                    decode_tokens=args.decode_tokens, repeat=args.repeat, hf=not args.no_hf, seed=args.seed,
                    progress=not args.quiet, clock=args.clock, quantized=args.quantized, only=only)
    print()
    print(format_speed_table(res["speed"]))
    failed = [c["name"] for c in res["checks"] if c["required"] and not c["passed"]]
    print(f"\n{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    common.write_outputs(args, res, self_test_markdown)
    return common.EXIT_FAILED if failed else common.EXIT_OK


# ----------------------------------------------------------------------------------------------
# `data`: end-to-end prepare (data_utils.py) vs bare encode_batch, and peak memory at 1x / Nx corpus size

def _cpu_seconds() -> float:
    import resource  # Unix only, like the peak-RSS measurement it comes with
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# A child's ru_maxrss also counts the pages of the parent it was forked from (with torch loaded:
# hundreds of MB), so prepare runs under this wrapper, which reports the peak of the memory exec gave
# it (VmHWM, Linux) on its last stderr line; elsewhere ru_maxrss is what there is.
_PEAK_WRAPPER = """\
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    try:
        with open("/proc/self/status") as f:
            print("VmHWM", *[line.split()[1] for line in f if line.startswith("VmHWM:")], file=sys.stderr)
    except OSError:
        pass
"""


def _run_measured(cmd: list[str]) -> tuple[float, int, float]:
    """Run a Python script (cmd = [python, script, args...]); return (seconds, peak RSS bytes of that
    process, CPU seconds user+sys)."""
    t0 = time.time()
    proc = subprocess.Popen([cmd[0], "-c", _PEAK_WRAPPER, *cmd[1:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
    proc.stderr.close()
    peak = ru.ru_maxrss * 1024
    if err and err[-1].startswith("VmHWM "):
        peak = int(err.pop().split()[1]) * 1024
    if os.waitstatus_to_exitcode(status) != 0:
        raise BenchmarkError(f"benchmark command failed ({' '.join(cmd)}): {err[-1] if err else 'no message'}")
    return time.time() - t0, peak, ru.ru_utime + ru.ru_stime


def make_scaled_corpus(source, out_dir, copies: int, text_key: str = "text") -> tuple[Path, int]:
    """Write `copies` copies of the documents of `source` into out_dir/corpus.txt (blank-line
    separated blocks); copy k > 0 prefixes each document with "[k] " so exact de-duplication does
    not collapse the copies. Returns (path, bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"corpus_x{copies}.txt"
    with open(path, "w", encoding="utf-8") as f:
        for k in range(copies):
            for d in readers.iter_documents(source, text_key):
                d = re.sub(r"\n\s*\n", "\n", d.replace("\n\n", "\n"))  # keep each document one block when re-read
                f.write((f"[{k}] " if k else "") + d.strip("\n") + "\n\n")
    return path, path.stat().st_size


def _measure_prepare(cmd: list[str], outd: Path) -> dict:
    """One `data_utils.py prepare` subprocess writing to outd (removed afterwards): its own timing
    (meta.json), process wall and CPU seconds, peak RSS and token count."""
    secs, rss, cpu = _run_measured(cmd)
    meta = json.loads((outd / "meta.json").read_text())
    shutil.rmtree(outd, ignore_errors=True)
    return {"seconds_pipeline": meta["seconds"], "seconds_process": round(secs, 3),
            "cpu_seconds_process": round(cpu, 3), "peak_rss_MB": round(rss / 2**20, 1),
            "tokens": meta["train"]["tokens"] + meta["val"]["tokens"],
            "filter_dropped": (meta.get("filter") or {}).get("dropped")}


def _time_encode(encode, docs: list[str], batch_docs: int) -> dict:
    """encode(batch) over documents already in memory, in batches of batch_docs as prepare does."""
    c0, t0 = _cpu_seconds(), time.time()
    n_tok = 0
    for i in range(0, len(docs), batch_docs):
        n_tok += sum(len(e) for e in encode(docs[i:i + batch_docs]))
    return {"seconds": round(time.time() - t0, 3), "cpu_seconds": round(_cpu_seconds() - c0, 3), "tokens": n_tok}


def _best(runs: list[dict], key: str, nbytes: int) -> dict:
    """The fastest of repeated runs (a shared machine's load slows some of them), its MB/s and all times."""
    best = min(runs, key=lambda r: r[key])
    return {**best, "MB_per_s": round(nbytes / 1e6 / best[key], 3), "all_seconds": [r[key] for r in runs]}


def _compare_at_1x(tok, corpus: Path, prepare_cmd, outd: Path, repeat: int, batch_docs: int) -> dict:
    """Alternate bare encode_batch, the faster encode prepare uses, and prepare end to end `repeat`
    times on the same corpus (so the machine's load hits all alike); keep the best of each."""
    docs = list(readers.iter_documents(corpus))
    nbytes = corpus.stat().st_size
    bare, fast, e2e = [], [], []
    for _ in range(max(1, repeat)):
        bare.append(_time_encode(partial(tok.backend.encode_batch, add_special_tokens=False), docs, batch_docs))
        fast.append(_time_encode(partial(text_tokenizer.fast_encode_batch, tok.backend), docs, batch_docs))
        e2e.append(_measure_prepare(prepare_cmd(corpus, outd), outd))
    res = {"corpus_bytes": nbytes, "docs": len(docs), "bare_encode_batch": _best(bare, "seconds", nbytes),
           "bare_encode_batch_fast": _best(fast, "seconds", nbytes),
           "end_to_end_x1": _best(e2e, "seconds_pipeline", nbytes)}
    for key, ref in (("end_to_end_vs_bare", "bare_encode_batch"),
                     ("end_to_end_vs_bare_fast", "bare_encode_batch_fast")):
        res[key] = round(res["end_to_end_x1"]["MB_per_s"] / res[ref]["MB_per_s"], 3)
    return res


def bench_prepare(input_source, tokenizer, workdir=None, filter_spec: str = "default", scale: int = 10,
                  batch_docs: int = 1024, repeat: int = 3, log=print) -> dict:
    """Throughput of prepare (read -> filter -> encode -> write, in a subprocess) vs bare
    encode_batch on the same documents held in memory, and peak RSS of prepare at 1x and
    `scale`x the corpus. end_to_end_vs_bare is prepare's MB/s over bare encode_batch's (1.0 = the
    pipeline costs nothing beyond tokenizing); CPU seconds are reported too."""
    tok = text_tokenizer.load_tokenizer(tokenizer)
    work = Path(workdir or tempfile.mkdtemp(prefix="fishai_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    def prepare_cmd(corpus, outd):
        return [sys.executable, str(Path(__file__).with_name("data_utils.py")), "prepare", "--input", str(corpus),
                "--tokenizer", str(tokenizer), "--output", str(outd), "--filter", filter_spec, "--overwrite",
                "--quiet", "--batch-docs", str(batch_docs)]

    res: dict = {"input": str(input_source), "tokenizer_vocab": tok.vocab_size, "filter": filter_spec,
                 "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "repeat": repeat}
    try:
        c1, _ = make_scaled_corpus(input_source, work / "c1", 1)
        res.update(_compare_at_1x(tok, c1, prepare_cmd, work / "out1", repeat, batch_docs))
        if scale and scale > 1:
            cp, nbytes = make_scaled_corpus(input_source, work / f"c{scale}", scale)
            run = _measure_prepare(prepare_cmd(cp, work / f"out{scale}"), work / f"out{scale}")
            res[f"end_to_end_x{scale}"] = {"corpus_bytes": nbytes, **run,
                                           "MB_per_s": round(nbytes / 1e6 / run["seconds_pipeline"], 3)}
            shutil.rmtree(work / f"c{scale}", ignore_errors=True)
            res["peak_rss_MB_x1_vs_xN"] = [res["end_to_end_x1"]["peak_rss_MB"], run["peak_rss_MB"]]
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if log:
        log(json.dumps(res, indent=2))
    return res


def run_data(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    res = bench_prepare(args.input, args.tokenizer, workdir=args.workdir, filter_spec=args.filter, scale=args.scale,
                        repeat=args.repeat, log=None)
    print(json.dumps(res, indent=2))
    common.write_outputs(args, res, lambda r: "```json\n" + json.dumps(r, indent=2) + "\n```\n")
    return common.EXIT_OK


# ----------------------------------------------------------------------------------------------
# `recipe`: AdamW + cosine (LR swept) vs the default recipe, same preset, data and token budget

@dataclass
class RecipeRun:
    name: str
    overrides: dict  # train.make_args keys beyond the shared ones
    curve: list = field(default_factory=list)  # [(tokens, val_loss)]
    result: dict = field(default_factory=dict)


def _multiples(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise BenchmarkError(f"{flag} {text!r}: give positive multiples, e.g. 0.5,1,2")
    return values


def baseline_run(lr: float, warmup: int) -> RecipeRun:
    return RecipeRun(f"adamw+cosine lr {lr:.2g} warmup {warmup}",
                     {"optimizer": "adamw", "schedule": "cosine", "lr": lr, "warmup": warmup})


def recipe_runs(cfg, baseline_lrs: list[float], default_lrs: list[float], warmup_fracs: list[float],
                steps: int) -> list[RecipeRun]:
    """The baseline (AdamW + cosine at each LR multiple x each warmup share of the steps: nanoGPT's
    runs warm up over a few percent to ~10% of the steps, more than the recipe's 2%) and the default
    recipe (at each multiple)."""
    base, new = train.recipe_for(cfg, "adamw"), train.recipe_for(cfg, "muon")
    warmups = sorted({max(1, math.ceil(w * steps)) for w in warmup_fracs})  # (short runs: shares can coincide)
    runs = [baseline_run(base["lr"] * m, w) for m in baseline_lrs for w in warmups]
    runs += [RecipeRun(f"default ({new['optimizer']}+{new['schedule']}) lr {new['lr'] * m:.2g}",
                       {"lr": new["lr"] * m} if m != 1 else {}) for m in default_lrs]
    return runs


def split_books(data: str) -> tuple[list[Path], list[Path]]:
    """(train, test) documents of a directory: whole files, every 10th held out (data_utils.holdout_split)."""
    files = sorted(p for p in Path(data).rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    if len(files) < 2:
        raise BenchmarkError(f"--data {data}: need a directory with at least 2 .txt/.md documents (books); "
                             "pass --data DIR")
    split = [data_utils.holdout_split(i, test_fraction=0.1) for i in range(len(files))]
    return ([f for f, s in zip(files, split) if s == "train"], [f for f, s in zip(files, split) if s == "test"])


def crossing_tokens(curve: list[tuple[int, float]], target: float) -> int | None:
    """Tokens at which a val-loss curve first reaches `target` (linear between evaluations)."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return tokens
            t0, l0 = prev
            return round(t0 + (tokens - t0) * (l0 - target) / (l0 - loss))
        prev = (tokens, loss)
    return None


def _train_recipe(run: RecipeRun, shared: dict, out: Path, progress: bool) -> None:
    t0 = time.time()
    summary = train.train(train.make_args(**shared, **run.overrides, output_dir=str(out)))
    per_step = summary["tokens_per_step"]
    metrics = train.read_metrics(out / train.METRICS_NAME)
    run.curve = [(m["step"] * per_step, m["val_loss"]) for m in metrics if "val_loss" in m]
    run.result = {"name": run.name, **run.overrides, "wall_s": round(time.time() - t0, 1),
                  "tokens": summary["tokens"], "final_val_loss": run.curve[-1][1], "curve": run.curve,
                  "metrics": metrics}
    if progress:
        print(f"{run.name}: final val loss {run.curve[-1][1]:.4f} in {run.result['wall_s']:.0f} s", flush=True)


def recipe_benchmark(args) -> dict:
    """Tokenizer and data from the training books, every run of recipe_runs, test bits/byte on the
    held-out books, and tokens-to-target against the best baseline's final val loss."""
    lr_multiples = _multiples(args.baseline_lrs, "--baseline-lrs")
    default_multiples = _multiples(args.default_lrs, "--default-lrs")
    warmups = _multiples(args.baseline_warmups, "--baseline-warmups")
    if max(warmups) >= 1:
        raise BenchmarkError(f"--baseline-warmups {args.baseline_warmups}: give shares of the steps below 1, e.g. 0.02,0.1")
    train_books, test_books = split_books(args.data)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fishai-recipe-"))
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    try:
        say(f"recipe: {len(train_books)} training and {len(test_books)} held-out documents in {args.data}")
        tokenizer_train.train_tokenizer((d for f in train_books for d in readers.iter_documents(str(f))),
                                        args.vocab_size, work / "tokenizer", show_progress=not args.quiet)
        data_utils.prepare([str(f) for f in train_books], str(work / "tokenizer"), str(work / "data"), val_fraction=0.05,
                   overwrite=True, show_progress=not args.quiet, log=say)
        vocab = text_tokenizer.load_tokenizer(str(work / "tokenizer")).vocab_size
        cfg = train.build_config(args.config, train.round_up(vocab), {})  # the model train.py builds
        rec = train.recipe_for(cfg)
        tokens_per_step = rec["batch_size"] * rec["grad_accum"] * train.default_seq_len(cfg)
        steps = max(2, args.tokens // tokens_per_step)
        runs = recipe_runs(cfg, lr_multiples, default_multiples, warmups, steps)
        shared = dict(config=args.config, data=str(work / "data"), max_steps=steps, seed=args.seed,
                      batch_size=rec["batch_size"], grad_accum=rec["grad_accum"],
                      eval_interval=max(1, steps // args.evals), eval_iters=args.eval_iters, save_interval=steps,
                      log_interval=max(1, steps // 50), sample_interval=0, device=args.device, dtype=args.dtype,
                      compile=args.compile, quiet=True, overwrite=True)
        test_texts = scoring.truncate_docs([f.read_text(encoding="utf-8", errors="replace") for f in test_books],
                                   args.test_chars)
        def run_one(i: int, run: RecipeRun) -> None:
            say(f"[{i + 1}/{len(runs)}] {run.name}: {steps} steps x {tokens_per_step:,} tokens")
            _train_recipe(run, shared, work / f"run{i}", not args.quiet)
            lm = scoring.load_lm(str(work / f"run{i}" / train.LATEST_NAME), device=args.device)
            run.result["test"] = {k: v for k, v in scoring.perplexity(lm, test_texts, progress=False).items()
                                  if isinstance(v, (int, float))}

        for i, run in enumerate(runs):
            run_one(i, run)
        for _ in range(args.max_extend):  # the best baseline LR at an edge of the sweep: widen it
            extra = widen_baseline(runs)
            if extra is None:
                break
            say(f"the best baseline LR is at the edge of the sweep: adding {extra.name}")
            runs.append(extra)
            run_one(len(runs) - 1, extra)
        return recipe_summary(args, cfg, runs, steps, tokens_per_step, len(train_books), len(test_books))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def best_baseline(runs: list[RecipeRun]) -> tuple[RecipeRun, bool]:
    """(the baseline run with the lowest final val loss, whether its LR is the sweep's lowest or highest)."""
    baselines = [r for r in runs if r.overrides.get("optimizer") == "adamw"]
    best = min(baselines, key=lambda r: r.result["final_val_loss"])
    lrs = sorted({r.overrides["lr"] for r in baselines})
    return best, len(lrs) > 1 and best.overrides["lr"] in (lrs[0], lrs[-1])


def widen_baseline(runs: list[RecipeRun]) -> RecipeRun | None:
    """The next baseline run when the best LR is at an edge: half the lowest or twice the highest LR,
    at the best run's warmup; None when the best is inside the sweep."""
    best, at_edge = best_baseline(runs)
    if not at_edge:
        return None
    lrs = [r.overrides["lr"] for r in runs if r.overrides.get("optimizer") == "adamw"]
    lr = min(lrs) / 2 if best.overrides["lr"] == min(lrs) else max(lrs) * 2
    return baseline_run(lr, best.overrides["warmup"])


def recipe_summary(args, cfg, runs: list[RecipeRun], steps: int, tokens_per_step: int, n_train: int,
                   n_test: int) -> dict:
    baselines = [r for r in runs if r.overrides.get("optimizer") == "adamw"]
    best, at_edge = best_baseline(runs)
    target = best.result["final_val_loss"]
    for r in runs:
        reach = crossing_tokens(r.curve, target)
        r.result["tokens_to_target"] = reach
        r.result["tokens_ratio"] = None if reach is None else reach / best.result["tokens"]
        r.result["bpb_vs_baseline"] = r.result["test"]["bits_per_byte"] / best.result["test"]["bits_per_byte"] - 1
    default = min((r for r in runs if r not in baselines), key=lambda r: r.result["final_val_loss"])
    return {"config": args.config, "params": count_params(cfg), "data": args.data, "train_docs": n_train,
            "test_docs": n_test, "steps": steps, "tokens_per_step": tokens_per_step, "tokens": steps * tokens_per_step,
            "device": args.device, "baseline_best": best.name, "target_val_loss": target,
            "baseline_lr_at_edge": at_edge, "baseline_runs": len(baselines),
            "baseline_lrs": sorted({r.overrides["lr"] for r in baselines}),
            "baseline_warmups": sorted({r.overrides["warmup"] for r in baselines}),
            "default_best": default.name, "runs": [r.result for r in runs],
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmark.py recipe " + " ".join(sys.argv[2:])}


def recipe_markdown(res: dict) -> str:
    lines = [f"# Training recipe: `{res['config']}` ({res['params'] / 1e6:.2f}M params), {res['tokens']:,} tokens "
             f"per run", "", f"`{res['command']}` ({res['date']}, device {res['device']}). Data: {res['data']}, "
             f"{res['train_docs']} training documents, {res['test_docs']} held out whole for the test. "
             f"{res['steps']} steps x {res['tokens_per_step']:,} tokens. Target = the best baseline's final "
             f"val loss ({res['baseline_best']}: {res['target_val_loss']:.4f}).", "",
             "| run | final val loss | tokens to target | vs baseline | test bits/byte | vs baseline | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        reach = "not reached" if r["tokens_to_target"] is None else f"{r['tokens_to_target']:,}"
        ratio = "" if r["tokens_ratio"] is None else f"{r['tokens_ratio']:.2f}x"
        lines.append(f"| {r['name']} | {r['final_val_loss']:.4f} | {reach} | {ratio} | "
                     f"{r['test']['bits_per_byte']:.4f} | {r['bpb_vs_baseline']:+.1%} | {r['wall_s']:.0f} |")
    lrs = ", ".join(f"{v:.2g}" for v in res["baseline_lrs"])
    lines += ["", f"Baseline sweep: {res['baseline_runs']} AdamW + cosine runs, LR {lrs} x warmup "
              f"{', '.join(map(str, res['baseline_warmups']))} steps (widened automatically while the best LR sat "
              f"at an edge, up to --max-extend times). The best baseline LR is "
              + ("**still at the edge of the sweep**: raise --max-extend or widen --baseline-lrs."
                 if res["baseline_lr_at_edge"] else "inside the sweep.")]
    return "\n".join(lines) + "\n"


def run_recipe(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    png = recipe_png(args)
    res = recipe_benchmark(args)
    print("\n" + recipe_markdown(res))
    if png:
        note = train.plot_losses([{"metrics": r.pop("metrics"), "label": r["name"]} for r in res["runs"]], png)
        res["png"] = None if note else png
    for r in res["runs"]:
        r.pop("metrics", None)
    common.write_outputs(args, res, recipe_markdown)
    return common.EXIT_OK


# ----------------------------------------------------------------------------------------------
# `gpu`: the one GPU check (verify and measure), each step a child process under its own time limit

@dataclass
class GpuCheck:
    args: Any
    work: Path
    deadline: float
    device: str
    limits: dict = field(default_factory=dict)  # step -> its planned seconds (GPU_STEP_SECONDS scaled)
    step: str = ""  # the step now running
    res: dict = field(default_factory=dict)

    def left(self) -> float:
        """Seconds the running step may still use: what is left of the budget less the planned
        limits of the steps after it, so that an early finish passes its time on and no step eats
        into the time of those after it."""
        names = list(self.limits)
        later = names[names.index(self.step) + 1:] if self.step in names else []
        return self.deadline - time.time() - sum(self.limits[n] for n in later)

    def run(self, name: str, cmd: list, cap: float | None = None) -> dict:
        """Run one command of the step (a child process in its own process group, output to
        logs/<name>.log) within what the step has left, at most `cap` seconds. On time-out the
        whole group is killed: compile workers or pytest's children must not hold the GPU that
        the next step needs."""
        limit = self.left() if cap is None else min(cap, self.left())
        if limit < 5:  # too short to start python and torch
            return {"status": "skipped", "why": f"{max(0, limit):.0f} s of the --budget left for it"}
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "w") as f:
            p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 cwd=Path(__file__).resolve().parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                rc = p.wait(timeout=limit)
            except BaseException as e:  # its own session: a Ctrl-C here would not reach it either
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                if not isinstance(e, subprocess.TimeoutExpired):
                    raise
                rc = None
        out = {"status": "ok" if rc == 0 else ("timed out" if rc is None else f"failed (exit {rc})"),
               "seconds": round(time.time() - t0, 1), "limit_s": round(limit, 1), "log": str(log)}
        if rc != 0:
            out["log_tail"] = log.read_text(errors="replace")[-1500:]
        print(f"gpu check: {name}: {out['status']} in {out['seconds']:.0f} s (limit {limit:.0f} s)", flush=True)
        return out

    def save(self) -> None:
        if self.args.json:
            common.write_json(self.args.json, self.res)


def _gpu_data(c: GpuCheck) -> dict:
    py, a = sys.executable, c.args
    # the tokenizer gets at most 60% of the step: prepare needs the rest
    r = c.run("tokenizer", [py, "tokenizer_train.py", "--data", a.data, "--vocab-size", a.vocab_size, "--max-bytes",
                            "5M", "--output-dir", c.work / "tokenizer", "--overwrite", "--quiet"],
              0.6 * c.limits["data"])
    if r["status"] == "ok":
        r = c.run("prepare", [py, "data_utils.py", "prepare", "--input", a.data, "--tokenizer", c.work / "tokenizer",
                              "--output", c.work / "data", "--overwrite", "--quiet"])
    return r


def _gpu_train(c: GpuCheck) -> dict:
    """A --seconds train.py run of the recipe (bf16, compiled): tokens/s and MFU of its log lines after
    the first two (compilation), against the isolated step of the self-test."""
    out = c.work / "train"
    seconds = c.args.seconds or max(5.0, c.limits["train"] - GPU_TRAIN_STARTUP)
    r = c.run("train", [sys.executable, "train.py", "--config", c.args.config, "--data", c.work / "data", "--output-dir",
                        out, "--overwrite", "--max-steps", 100_000, "--max-time", round(seconds, 1), "--eval-interval",
                        100_000, "--save-interval", 100_000, "--sample-interval", 0, "--log-interval", 10,
                        "--device", c.device, "--no-progress"])
    metrics = [m for m in train.read_metrics(out / train.METRICS_NAME) if "tokens_per_sec" in m] \
        if (out / train.METRICS_NAME).exists() else []
    steady = metrics[2:] or metrics
    if steady:
        r.update(steps=metrics[-1]["step"], tokens_per_sec=_median([m["tokens_per_sec"] for m in steady]),
                 mfu=_median([m.get("mfu") or 0 for m in steady]),
                 loss_first=metrics[0]["loss"], loss_last=metrics[-1]["loss"])
    return r


def _gpu_profile(c: GpuCheck) -> dict:
    """gpu_profile_main in a child process: the profile of one training and one decode step and the
    engine's decode speed. The child rewrites its JSON after each part, so a time-out keeps the
    parts done."""
    js = c.work / "profile.json"
    js.unlink(missing_ok=True)  # a --workdir reused: figures of an earlier call are not this one's
    main = "import sys, benchmark; sys.exit(benchmark.gpu_profile_main(sys.argv[1:]))"
    r = c.run("profile", [sys.executable, "-c", main, c.args.config, c.device, js])
    if js.exists():
        r.update(json.loads(js.read_text()))
    return r


def _gpu_self_test(c: GpuCheck) -> dict:
    js = c.work / "self-test.json"
    js.unlink(missing_ok=True)  # a --workdir reused: figures of an earlier call are not this one's
    # only the rows no other step gives (the profile step times the engine's decode): the training step
    # against HF's in the same step, and int8/int4 decode against bf16; all of it ran past 240 s
    r = c.run("self-test", [sys.executable, "benchmark.py", "self-test", "--config", c.args.config, "--device", c.device,
                            "--compile", "--only", "train,quantized", "--repeat", 2, "--batch-size", 32, "--seq-len",
                            512, "--quiet", "--json", js, "--overwrite"])
    if js.exists():
        st = json.loads(js.read_text())
        r.update(passed=st["passed"], failed=[ch["name"] for ch in st["checks"] if not ch["passed"]],
                 speed=st["speed"], device_name=st["device_name"], torch=st["torch"])
    return r


def _gpu_pytest(c: GpuCheck) -> dict:
    r = c.run("pytest", [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider"])
    tail = Path(r["log"]).read_text(errors="replace").strip().splitlines() if "log" in r else []
    r["summary"] = tail[-1] if tail else ""
    return r


def _gpu_recipe(c: GpuCheck) -> dict:
    js = c.work / "recipe.json"
    js.unlink(missing_ok=True)
    r = c.run("recipe", [sys.executable, "benchmark.py", "recipe", "--config", c.args.config, "--data", c.args.data,
                         "--tokens", c.args.recipe_tokens, "--vocab-size", 8192, "--device", c.device, "--quiet",
                         "--json", js, "--report", c.work / "recipe.md", "--overwrite"])
    if js.exists():
        rec = json.loads(js.read_text())
        r.update({k: rec[k] for k in ("baseline_best", "default_best", "baseline_lr_at_edge", "target_val_loss")},
                 runs=[{k: v for k, v in run.items() if k not in ("curve",)} for run in rec["runs"]],
                 markdown=(c.work / "recipe.md").read_text())
    return r


GPU_STEP_FNS = {"data": _gpu_data, "train": _gpu_train, "profile": _gpu_profile, "self-test": _gpu_self_test,
                "pytest": _gpu_pytest, "recipe": _gpu_recipe}


# -- the profile step's child: where the time of one training step and one decode step goes

PROFILE_TOP = 10  # kernels (ops on a CPU) listed per profiled step
PROFILE_CPU_BATCH = (2, 64)  # the CPU dry run's training batch x length: its profile in seconds
PROFILE_PROMPT = 32  # decode prompt tokens, as the self-test's decode rows


def profile_summary(events, wall_ms: float, cuda: bool, top: int = PROFILE_TOP) -> dict:
    """One step's torch.profiler key_averages() as figures: the top kernels by self GPU time (on a
    CPU the top ops by self CPU time), the GPU's busy time (its kernels and copies: on one stream
    they never overlap, so their sum is the time it worked) and the host-idle time, the step's wall
    time less that busy time: how long the GPU sat waiting for the host to give it work."""
    if cuda:
        rows = [(e.key, e.self_device_time_total, e.count) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    rows.sort(key=lambda r: -r[1])
    busy = sum(r[1] for r in rows) / 1e3
    out = {"wall_ms": round(wall_ms, 3), "top_by": "self GPU time" if cuda else "self CPU time",
           "top": [{"name": k[:160], "ms": round(us / 1e3, 4), "calls": n, "share": round(us / 1e3 / busy, 4)}
                   for k, us, n in rows[:top] if us > 0]}
    if not cuda:
        return {**out, "cpu_total_ms": round(busy, 3), "device_busy_ms": None, "host_idle_ms": None,
                "host_idle_share": None, "host_idle_why": "no GPU: on a CPU the host does the work itself"}
    if not rows:  # CUPTI gave no kernel records: a busy time of 0 would call the whole step idle
        return {**out, "device_busy_ms": None, "host_idle_ms": None, "host_idle_share": None,
                "host_idle_why": "the profiler recorded no GPU kernels"}
    idle = max(0.0, wall_ms - busy)
    return {**out, "device_busy_ms": round(busy, 3), "host_idle_ms": round(idle, 3),
            "host_idle_share": round(idle / wall_ms, 4) if wall_ms > 0 else None}


def profile_step(fn, device: str, warmup: int, repeat: int = 3) -> dict:
    """fn warmed up (compilation, CUDA graph capture), its wall time (the median of `repeat` runs
    without the profiler, whose own host overhead would inflate the idle time), then one run under
    torch.profiler, summarised by profile_summary."""
    from torch.profiler import ProfilerActivity, profile

    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    cuda = device == "cuda"
    for _ in range(warmup):
        fn()
    wall = _median([timed() for _ in range(repeat)])
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        profiled = timed()
    out = profile_summary(prof.key_averages(), wall * 1e3, cuda)
    out["wall_ms_profiled"] = round(profiled * 1e3, 3)
    return out


def _profile_train(cfg_name: str, device: str) -> dict:
    """One real train.py step (train.step_runner: the recipe's batch for this device, Muon + AdamW,
    clipping, autocast, torch.compile on CUDA, as train.py runs it) of a fresh --config model."""
    cfg, cuda = CONFIGS[cfg_name], device == "cuda"
    shape = {} if cuda else dict(batch_size=PROFILE_CPU_BATCH[0], grad_accum=1, seq_len=PROFILE_CPU_BATCH[1])
    args = train.make_args(max_steps=10_000, **shape)
    args.seq_len = args.seq_len or train.default_seq_len(cfg)
    train.apply_recipe(args, cfg, gpu_bytes=train.gpu_memory_bytes(device))
    dtype = common.resolve_dtype(args.dtype, device)
    g = torch.Generator().manual_seed(0)
    xb, yb = (torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
              for _ in range(2))
    torch.manual_seed(0)
    step = train.step_runner(GPT(cfg).to(device), args, device, dtype, [(xb, yb)])
    out = profile_step(step, device, warmup=3 if cuda else 1)
    tok_s = args.batch_size * args.grad_accum * args.seq_len / (out["wall_ms"] / 1e3)
    peak = device_peak_flops(device, dtype)
    return {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "seq_len": args.seq_len,
            "dtype": common.dtype_name(str(dtype)), "compiled": train.use_compile(args, torch.device(device)),
            "tokens_per_sec": round(tok_s, 1),
            "mfu": round(estimate_mfu(tok_s, cfg, args.seq_len, peak), 4) if peak else None, **out}


def _decode_speed(eng, device: str, new_tokens: int, repeat: int = 3) -> dict:
    """Decode tokens/s of `eng` (all its rows) over a PROFILE_PROMPT-token prompt: the engine's own
    stream, as generate.py decodes; the median of `repeat` runs after one warm-up."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(eng.config.vocab_size, (eng.batch, PROFILE_PROMPT), generator=g).to(device)

    def run() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in eng.stream(idx, new_tokens, temperature=0):
            pass
        _sync(device)
        return time.perf_counter() - t0

    run()
    secs = _median([run() for _ in range(repeat)])
    return {"tokens_per_sec": round(eng.batch * new_tokens / secs, 1), "batch": eng.batch,
            "prompt": PROFILE_PROMPT, "new_tokens": new_tokens, "path": eng.path}


def gpu_profile_main(argv: list) -> int:
    """The profile step's child (python -c ... CONFIG DEVICE JSON): one training step profiled, the
    engine's batch-1 and batch-8 decode tokens/s (compile=True on CUDA: the compiled static step
    replayed as a CUDA graph; eager on a CPU) and one batch-1 decode step profiled. The JSON is
    rewritten after each part; a part that fails is named there and the others still run."""
    cfg_name, device, js = argv
    cuda, res, failed = device == "cuda", {"config": cfg_name}, False

    def part(key, fn):
        nonlocal failed
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 - one part's error (OOM, no compiler) is its figure
            res[key], failed = {"error": _exc_line(e)}, True
        Path(js).write_text(json.dumps(res, indent=2))

    part("train_step", lambda: _profile_train(cfg_name, device))
    if cuda:  # the training step's model and optimizer state are gone: give their memory back
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    # the model in the run dtype, as generate.py loads it (bf16 on CUDA, fp32 on a CPU)
    model = GPT(CONFIGS[cfg_name]).to(device=device, dtype=common.resolve_dtype("auto", device)).eval()
    new_tokens, engines = (128 if cuda else 16), {}

    def decode(batch: int) -> dict:
        t0 = time.perf_counter()  # the engine's compile and CUDA graph capture: part of the step's time
        eng = engines[batch] = engine.Engine(model, batch, compile=cuda)
        return {"build_s": round(time.perf_counter() - t0, 2), **_decode_speed(eng, device, new_tokens)}

    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    for batch in (1, 8):
        part(f"decode_b{batch}", lambda: decode(batch))
        if batch == 1 and 1 in engines:  # one step as the stream runs it: a (1, 1) token after the prompt
            eng = engines[1]
            part("decode_step", lambda: {"path": eng.path, **profile_step(
                lambda: eng.step(tok, PROFILE_PROMPT), device, warmup=3)})
        engines.clear()  # one KV cache (and CUDA graph) at a time
    return 1 if failed else 0


def gpu_summary(res: dict) -> dict:
    """The headline figures: the train loop against its own isolated step and HF's, the engine's
    compiled decode at batch 1 and 8, int8/int4 decode against it at batch 1, and where the
    profiled steps' time goes."""
    speed = (res.get("self-test") or {}).get("speed") or {}
    loop = (res.get("train") or {}).get("tokens_per_sec")
    step = speed.get("train_tok_s") or {}
    prof = res.get("profile") or {}
    b1, b8 = ((prof.get(k) or {}).get("tokens_per_sec") for k in ("decode_b1", "decode_b8"))
    ts, ds = prof.get("train_step") or {}, prof.get("decode_step") or {}
    out = {"train_loop_tok_s": loop, "train_loop_mfu": (res.get("train") or {}).get("mfu"),
           "isolated_step_tok_s": step.get("ours"), "hf_same_step_tok_s": step.get("hf"),
           "loop_vs_isolated_step": loop / step["ours"] if loop and step.get("ours") else None,
           "loop_vs_hf_step": loop / step["hf"] if loop and step.get("hf") else None,
           "engine_decode_b1_tok_s": b1, "engine_decode_b8_tok_s": b8,
           "engine_decode_b8_vs_b1": b8 / b1 if b1 and b8 else None}
    for q in ("int8", "int4"):  # the self-test's compiled rows on CUDA, its eager ones elsewhere
        row = speed.get(f"quant_{q}_b1_compiled_tok_s") or speed.get(f"quant_{q}_b1_tok_s") or {}
        out[f"{q}_decode_b1_tok_s"] = row.get("ours")
        out[f"{q}_vs_engine_decode_b1"] = row["ours"] / b1 if row.get("ours") and b1 else None
    return {**out, "train_step_ms": ts.get("wall_ms"), "train_step_host_idle_share": ts.get("host_idle_share"),
            "train_step_top_kernel": ((ts.get("top") or [{}])[0]).get("name"),
            "decode_step_ms": ds.get("wall_ms"), "decode_step_host_idle_share": ds.get("host_idle_share"),
            "decode_step_top_kernel": ((ds.get("top") or [{}])[0]).get("name")}


def run_gpu(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise BenchmarkError("benchmark.py gpu needs a CUDA GPU: torch.cuda.is_available() is False here (on a CPU "
                             "the same figures come from self-test, full and recipe)")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(GPU_STEPS):
        raise BenchmarkError(f"--skip {args.skip}: choose from {', '.join(GPU_STEPS)}")
    if not Path(args.data).is_dir():
        raise BenchmarkError(f"--data {args.data}: no such directory; pass a directory of text files (books)")
    if args.config not in CONFIGS:
        raise BenchmarkError(f"--config {args.config}: choose from {', '.join(CONFIGS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fishai-gpu-")).resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    limits = {n: GPU_STEP_SECONDS[n] * args.budget / GPU_BUDGET for n in GPU_STEPS if n not in skip}
    # a skipped step's share is not handed out: the check ends within the limits of the steps it runs
    c = GpuCheck(args, work, time.time() + sum(limits.values()), device, limits)
    c.res.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=device,
                 device_name=torch.cuda.get_device_name() if device == "cuda" else "CPU", torch=torch.__version__,
                 command="python benchmark.py gpu " + " ".join(sys.argv[2:]), workdir=str(work),
                 budget_s=args.budget, limits_s={n: round(s, 1) for n, s in limits.items()})
    c.save()
    t0 = time.time()
    for name in GPU_STEPS:
        if name in skip or (name == "train" and c.res["data"]["status"] != "ok"):
            c.res[name] = {"status": "skipped"}
            continue
        c.step = name
        c.res[name] = GPU_STEP_FNS[name](c)
        c.res["summary"] = gpu_summary(c.res)
        c.save()
    c.res["seconds"] = round(time.time() - t0, 1)
    c.save()
    print(json.dumps(c.res["summary"], indent=2))
    failed = [n for n in GPU_STEPS if c.res[n]["status"] not in ("ok", "skipped")]
    failed += ["self-test checks"] if (c.res.get("self-test") or {}).get("passed") is False else []
    print("gpu check: " + ("all steps ok" if not failed else "FAILED: " + ", ".join(failed)))
    return common.EXIT_FAILED if failed else common.EXIT_OK


# ----------------------------------------------------------------------------------------------
# `serve`: serve.py under load (through its HTTP API, as a client sees it)

def _http_json(url: str, body: dict, timeout: float = 300) -> dict:
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _first_chunk_seconds(url: str, body: dict) -> float:
    """Seconds from sending a streaming request to its first chunk carrying text."""
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                if any(c.get("text") or (c.get("delta") or {}).get("content") for c in choices):
                    return time.perf_counter() - t0
    return time.perf_counter() - t0


def _stream_token_times(url: str, body: dict, t_start: float) -> list[float]:
    """Seconds after t_start at which each text chunk of a streamed request arrived."""
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: {") and any(c.get("text") for c in json.loads(line[6:])["choices"]):
                times.append(time.perf_counter() - t_start)
    return times


def _streams_with_a_long_prompt(url: str, body: dict, long_prompt: list | None, streams: int = 4) -> dict:
    """`streams` streamed requests decoding; with long_prompt, a request with it arrives once they
    run. Returns the streams' inter-token gaps (those after the long prompt arrived, when given)
    and the long prompt's time to its first token."""
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams + 1) as pool:
        running = [pool.submit(_stream_token_times, url, body, t0) for _ in range(streams)]
        arrived, ttft = None, None
        if long_prompt is not None:
            time.sleep(0.1)  # the streams are decoding by now
            arrived = time.perf_counter() - t0
            ttft = _first_chunk_seconds(url, {**body, "prompt": long_prompt, "max_tokens": 1})
        times = [f.result() for f in running]
    gaps = [b - a for ts in times for a, b in zip(ts, ts[1:]) if arrived is None or a >= arrived]
    return {"gaps": gaps, "ttft": ttft}


def _stall_rows(chunked: "_ServerUnderTest", whole: "_ServerUnderTest", name: str, context: int, args) -> dict:
    """A long prompt arriving while 4 streams decode: their p99 inter-token gap against their median
    alone, and its time to first token prefilled in chunks against in one piece (same scenario)."""
    body = {"model": name, "prompt": list(range(5, 37)), "max_tokens": 4 * args.tokens, "temperature": 0}
    long_prompt = [5 + (i * 7919) % 200 for i in range(min(2000, context - 8))]
    url = "/v1/completions"
    alone = _streams_with_a_long_prompt(chunked.url + url, body, None)
    during = _streams_with_a_long_prompt(chunked.url + url, body, long_prompt)
    unchunked = _streams_with_a_long_prompt(whole.url + url, body, long_prompt)
    p99 = sorted(during["gaps"])[max(0, math.ceil(0.99 * len(during["gaps"])) - 1)] if during["gaps"] else float("nan")
    median_alone = _median(alone["gaps"])
    return {"long_prompt_tokens": len(long_prompt), "itl_median_alone_ms": median_alone * 1e3,
            "itl_p99_during_long_prefill_ms": p99 * 1e3, "itl_p99_over_median": p99 / median_alone,
            "long_prompt_ttft_chunked_s": during["ttft"], "long_prompt_ttft_unchunked_s": unchunked["ttft"],
            "ttft_chunked_over_unchunked": during["ttft"] / unchunked["ttft"]}


class _ServerUnderTest:
    def __init__(self, files: dict, device: str, extra: tuple = ()):
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        args = [sys.executable, str(Path(__file__).with_name("serve.py")), "--port", str(self.port), "--device", device,
                "--max-batch", "16", "--log-level", "warning", *extra]
        for name, path in files.items():
            args += ["--model", f"{name}={path}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        import urllib.request
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise BenchmarkError("serve.py did not start within 2 minutes")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _many_streams_tok_s(url: str, body: dict, args) -> float:
    """Aggregate tokens/s of args.streams concurrent requests (median of args.repeat runs)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(args.streams) as pool:
        many = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            done = list(pool.map(lambda _: _http_json(url, body)["usage"]["completion_tokens"], range(args.streams)))
            many.append(sum(done) / (time.perf_counter() - t0))
    return _median(many)


def _serve_rows(srv: _ServerUnderTest, name: str, path: Path, args) -> dict:
    """One model's figures: one stream, N concurrent, TTFT, and the server vs generate.py."""
    url, n = srv.url + "/v1/completions", args.tokens
    gpt = load_model(path, device=args.device)
    prompt = [int(t) for t in torch.randint(4, gpt.tokenizer.vocab_size, (32,), generator=torch.Generator().manual_seed(0))]
    body = {"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0}

    def one() -> tuple[float, int]:
        t0 = time.perf_counter()
        r = _http_json(url, body)
        return time.perf_counter() - t0, r["usage"]["completion_tokens"]

    def local() -> float:  # generate.py's decode loop on the same file, same prompt
        idx = torch.tensor([prompt], device=gpt.norm.weight.device)
        t0 = time.perf_counter()
        for _ in engine.generate_stream(gpt, idx, n, temperature=0):
            pass
        return time.perf_counter() - t0

    one(), local()  # warm-up
    single, here = [], []
    for _ in range(args.repeat):  # interleaved: both see the same machine
        single.append(one())
        here.append(local())
    many_tps = _many_streams_tok_s(url, body, args)
    ttft = _median([_first_chunk_seconds(srv.url + "/v1/completions", {**body, "max_tokens": 1}) for _ in range(5)])
    one_tps = _median([t / s for s, t in single])
    server_s, local_s = _median([s for s, _ in single]), _median(here)
    return {"model": name, "file": str(path), "params": count_params(gpt.config), "tokens": n,
            "context_length": gpt.config.max_seq_len,
            "one_stream_tok_s": one_tps, f"{args.streams}_streams_tok_s": many_tps, "concurrency_gain": many_tps / one_tps,
            "ttft_32_token_prompt_ms": ttft * 1e3, "server_request_s": server_s,
            "generate_py_s": local_s, "server_overhead": server_s / local_s - 1}


def serve_markdown(res: dict) -> str:
    k = res["streams"]
    lines = [f"# serve.py under load ({res['date']}, {res['device']})", "", f"`{res['command']}`", "",
             f"| model | one stream tok/s | {k} streams tok/s | gain | {k} streams, --deterministic | TTFT (32-token "
             "prompt) | server vs generate.py, one stream |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['one_stream_tok_s']:,.0f} | "
                     f"{r[f'{k}_streams_tok_s']:,.0f} | {r['concurrency_gain']:.2f}x | "
                     f"{r['deterministic_streams_tok_s']:,.0f} ({r['deterministic_cost']:.0%} less) | "
                     f"{r['ttft_32_token_prompt_ms']:.0f} ms | {r['server_overhead']:+.1%} |")
    lines += ["", "A long prompt arriving while 4 streams decode (prefilled in pieces of at most 256 tokens, each "
              "held to a few of their turns' time, --prefill-stall-steps: serve.py's defaults; against in one piece):", "",
              "| model | long prompt | inter-token gap alone, median | during its prefill, p99 | p99 / median | its TTFT "
              "chunked | in one piece | chunked / one piece |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        st = r["long_prompt"]
        lines.append(f"| {r['model']} | {st['long_prompt_tokens']} tokens | {st['itl_median_alone_ms']:.1f} ms | "
                     f"{st['itl_p99_during_long_prefill_ms']:.1f} ms | {st['itl_p99_over_median']:.1f}x | "
                     f"{st['long_prompt_ttft_chunked_s']:.2f} s | {st['long_prompt_ttft_unchunked_s']:.2f} s | "
                     f"{st['ttft_chunked_over_unchunked']:.2f}x |")
    return "\n".join(lines) + "\n"


def _random_model_with_tokenizer(config: str, work: Path) -> GPT:
    """The preset with random weights and a BPE tokenizer of its vocabulary, trained on the Python
    documentation (the server needs a tokenizer to decode what it streams)."""
    cfg = get_config(config)
    tok_dir = work / f"tok{cfg.vocab_size}"
    if not tok_dir.exists():
        docs = readers.iter_documents("python-docs")
        tokenizer_train.train_tokenizer(docs, cfg.vocab_size, tok_dir, show_progress=False, max_bytes=8_000_000)
    tok = text_tokenizer.load_tokenizer(tok_dir)
    # a context of at least 2,112 tokens: the long-prompt figures send a 2,000-token prompt
    gpt = GPT(get_config(config, vocab_size=train.round_up(tok.vocab_size), max_seq_len=max(cfg.max_seq_len, 2112)))
    gpt.tokenizer = tok
    return gpt


def _serve_all(files: dict, args) -> list[dict]:
    """Every figure of every model: the default server, then one with --deterministic (its batch
    throughput) and one that prefills in one piece (the long prompt's stall)."""
    srv = _ServerUnderTest(files, args.device)
    try:
        rows = [_serve_rows(srv, name, path, args) for name, path in files.items()]
        det = _ServerUnderTest(files, args.device, ("--deterministic",))
        try:
            for r in rows:
                body = {"model": r["model"], "prompt": list(range(5, 37)), "max_tokens": args.tokens, "temperature": 0}
                r["deterministic_streams_tok_s"] = _many_streams_tok_s(det.url + "/v1/completions", body, args)
                r["deterministic_cost"] = 1 - r["deterministic_streams_tok_s"] / r[f"{args.streams}_streams_tok_s"]
        finally:
            det.stop()
        whole = _ServerUnderTest(files, args.device, ("--prefill-chunk", "100000", "--prefill-stall-steps", "0"))
        try:
            for r in rows:
                r["long_prompt"] = _stall_rows(srv, whole, r["model"], r["context_length"], args)
        finally:
            whole.stop()
    finally:
        srv.stop()
    return rows


def run_serve_bench(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise BenchmarkError(f"--configs {args.configs}: choose from {', '.join(CONFIGS)}")
    work = Path(tempfile.mkdtemp(prefix="fishai-serve-bench-"))
    try:
        files = {}
        for c in configs:
            torch.manual_seed(0)
            ckpt = work / f"{c}.pt"
            save_checkpoint(ckpt, _random_model_with_tokenizer(c, work))
            files[f"{c}-{args.strategy}"] = work / f"{c}-{args.strategy}.bin"
            _quantize_cli(ckpt, files[f"{c}-{args.strategy}"], args.strategy)
        rows = _serve_all(files, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "streams": args.streams, "rows": rows,
           "command": "python benchmark.py serve " + " ".join(sys.argv[2:])}
    print(serve_markdown(res))
    common.write_outputs(args, res, serve_markdown)
    return common.EXIT_OK


WORKDIR_NAMES = re.compile(r"^(c\d+|out\d+|run\d+|tok\d+|tokenizer|data|train|logs|[\w-]+\.(pt|bin|json|md|png))$")


def recipe_png(args) -> str | None:
    """recipe's plot: --png, or beside --report."""
    return args.png or (str(Path(args.report).with_suffix(".png")) if args.report else None)


def output_plan(args) -> tuple[list, list]:
    """What each command writes (--json, --report; recipe's --png; --workdir, where data, recipe and
    gpu keep their corpora, tokenizers and runs) and reads."""
    outs = common.result_outputs(args)
    if getattr(args, "workdir", None):
        outs.append(common.Output(args.workdir, "--workdir", "folder", owns=lambda n: bool(WORKDIR_NAMES.match(n))))
    if args.command == "recipe":
        outs.append(common.Output(recipe_png(args), "--png", "png"))
    inputs = {"full": [("--model", args.model if args.command == "full" and not args.hf else None),
                       *common.eval_text_inputs(args)],
              "data": [("--input", getattr(args, "input", None)), ("--tokenizer", getattr(args, "tokenizer", None))],
              "recipe": [("--data", getattr(args, "data", None))], "gpu": [("--data", getattr(args, "data", None))]}
    return outs, inputs.get(args.command, [])


COMMANDS = {"self-test": run_self_test, "full": run_full, "data": run_data, "recipe": run_recipe, "gpu": run_gpu,
            "serve": run_serve_bench}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_cli(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
