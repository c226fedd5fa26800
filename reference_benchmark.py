"""Score reference models (Pythia, GPT-2, SmolLM2, any transformers causal LM) exactly like FishAI.

Every model goes through benchmark.py's own `load_lm` and `perplexity` (imported, not copied), on
the same texts with the same windows, so the numbers sit side by side fairly: compare word-level
perplexity and bits per byte across models (token perplexity depends on the tokenizer).

Usage:
    # the four reference models on the HF test sets, next to a FishAI checkpoint
    python reference_benchmark.py --fishai checkpoints/fishai-best.pt

    # local data files (the shared copies), a subset of models, results as JSON + markdown
    python reference_benchmark.py --models gpt2,EleutherAI/pythia-70m --fishai checkpoints/fishai-best.pt \
        --wikitext103 ../shared/data/wikitext103/wiki.test.tokens --wikitext2 ../shared/data/wikitext2/test.txt \
        --ptb ../shared/data/ptb/ptb.valid.txt --json reference.json --report reference.md

    # any local directory saved with save_pretrained works as a model
    python reference_benchmark.py --models ./my-hf-model --data mytext=notes.txt --max-chars 200000

Offline (no hub access) a model that is not in the local cache prints a one-line error and the run
continues with the others. trust_remote_code is never used. The GPT-2 paper's own figures are shown
as "published" (zero-shot, with its detokenizers; not measured here).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from benchmark import (DATASET_LABELS, BenchmarkError, add_data_args, add_output_args,
                       check_outputs, fmt_ppl, load_datasets, load_lm, parse_data_flags, perplexity,
                       resolve_device, run_cli, write_outputs)

DEFAULT_MODELS = ["EleutherAI/pythia-70m", "EleutherAI/pythia-160m", "gpt2", "HuggingFaceTB/SmolLM2-135M"]

# Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", Table 3, GPT-2 117M,
# zero-shot perplexity with invertible detokenizers. Published figures, NOT measured by this script.
PUBLISHED = {
    "gpt2 (published, GPT-2 paper)": {
        "source": "Radford et al. 2019, Table 3 (117M, zero-shot, detokenized)",
        "word_ppl": {"wikitext2": 29.41, "wikitext103": 37.50, "ptb": 65.85},
    },
}


def score_model(spec: str, datasets: dict, *, fishai: bool, device: str, dtype, stride, batch_size: int,
                max_seq_len, progress: bool) -> dict:
    """Load one model through benchmark.load_lm and run benchmark.perplexity on every dataset."""
    lm = load_lm(spec, device=device, dtype=dtype, hf=not fishai, max_seq_len=max_seq_len)
    try:
        s = stride if stride is None else min(int(stride), lm.max_seq_len)
        params = sum(p.numel() for p in lm.model.parameters())
        out = {"kind": lm.kind, "params": params, "max_seq_len": lm.max_seq_len, "begin_id": lm.begin_id,
               "stride": s or lm.max_seq_len, "perplexity": {}}
        for name, docs in datasets.items():
            r = perplexity(lm, docs, stride=s, batch_size=batch_size, progress=progress)
            out["perplexity"][name] = r
            print(f"  {DATASET_LABELS.get(name, name)}: word ppl {fmt_ppl(r['word_ppl'])}, token ppl "
                  f"{fmt_ppl(r['token_ppl'])}, bits/byte {r['bits_per_byte']:.4f} ({r['seconds']:.1f}s)",
                  flush=True)
        return out
    finally:
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def format_table(models: dict, names: list[str], published: dict | None) -> str:
    """Side-by-side table: word PPL and bits/byte per dataset, one row per model."""
    head = f"{'model':<36}{'params':>9}{'ctx':>6}"
    for n in names:
        lab = DATASET_LABELS.get(n, n)[:12]
        head += f"{lab + ' wPPL':>18}{'bpb':>8}"
    lines = [head]
    for spec, r in models.items():
        row = f"{spec[-36:]:<36}"
        if "error" in r:
            lines.append(row + f"  not scored: {r['error'][:80]}")
            continue
        row += f"{r['params'] / 1e6:>8.1f}M{r['max_seq_len']:>6}"
        for n in names:
            p = r["perplexity"].get(n)
            wppl = fmt_ppl(p["word_ppl"]) if p else "n/a"
            bpb = f"{p['bits_per_byte']:.4f}" if p else "n/a"
            row += f"{wppl:>18}{bpb:>8}"
        lines.append(row)
    for label, pub in (published or {}).items():
        row = f"{label[-36:]:<36}{'':>9}{'':>6}"
        for n in names:
            v = pub["word_ppl"].get(n)
            row += f"{(f'{v:.2f}' if v is not None else '-'):>18}{'-':>8}"
        lines.append(row)
    return "\n".join(lines)


def report_markdown(res: dict) -> str:
    names = res["datasets"]
    out = ["# Reference models scored like FishAI", "",
           f"{res['date']}; device {res['settings']['device']}; stride "
           f"{res['settings']['stride'] or 'context length (disjoint windows)'}; every model is scored by "
           "benchmark.py's perplexity() on the same texts (word counts and bytes from the original text).", "",
           "| model | params | context | " + " | ".join(
               f"{DATASET_LABELS.get(n, n)} word PPL | {DATASET_LABELS.get(n, n)} token PPL | "
               f"{DATASET_LABELS.get(n, n)} bits/byte" for n in names) + " |",
           "|---|---:|---:|" + "---:|" * (3 * len(names))]
    for spec, r in res["models"].items():
        if "error" in r:
            out.append(f"| {spec} | not scored: {r['error']} |" + " |" * (1 + 3 * len(names)))
            continue
        cells = []
        for n in names:
            p = r["perplexity"].get(n)
            cells += ([fmt_ppl(p["word_ppl"]), fmt_ppl(p["token_ppl"]), f"{p['bits_per_byte']:.4f}"] if p
                      else ["n/a"] * 3)
        out.append(f"| {spec} ({r['kind']}) | {r['params'] / 1e6:.1f}M | {r['max_seq_len']} | "
                   + " | ".join(cells) + " |")
    for label, pub in res.get("published", {}).items():
        cells = []
        for n in names:
            v = pub["word_ppl"].get(n)
            cells += [f"{v:.2f}" if v is not None else "-", "-", "-"]
        out.append(f"| {label} | 124M | 1024 | " + " | ".join(cells) + " |")
    if res.get("published"):
        out += ["", "Published rows are the papers' own figures (zero-shot, with their detokenizers), "
                "not measured here; they used detokenized text and their own word counts."]
    for name, msg in res.get("dataset_errors", {}).items():
        out.append(f"- dataset {name}: not scored: {msg}")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score reference LMs (Pythia, GPT-2, SmolLM2, ...) with benchmark.py's "
                                "functions, side by side with FishAI models.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Usage:" + __doc__.split("Usage:")[1].split("Offline")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated transformers models: hub names or local dirs "
                        f"(default: {','.join(DEFAULT_MODELS)}); '' for none")
    p.add_argument("--fishai", action="append", default=[], metavar="PATH",
                   help="FishAI model to score alongside (.pt, .bin or FishAI HF dir); repeatable")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=None, help="model dtype: float32, bf16, fp16 (default: as stored)")
    add_data_args(p)
    p.add_argument("--no-published", action="store_true", help="do not show the published GPT-2 figures")
    add_output_args(p)
    return p


def run(args) -> int:
    check_outputs(args)
    if args.stride is not None and args.stride < 1:
        raise BenchmarkError(f"--stride {args.stride}: must be >= 1")
    device = resolve_device(args.device)
    specs = parse_data_flags(args)
    ds_errors: dict = {}
    datasets = load_datasets(specs, split=args.split, limit=args.limit, errors=ds_errors,
                             max_chars=args.max_chars, detokenize=args.detokenize)
    for msg in ds_errors.values():
        print(f"error: {msg}", file=sys.stderr)
    if not datasets:
        raise BenchmarkError("no dataset could be loaded; pass local files (--wikitext103 PATH, --wikitext2 PATH, "
                             "--ptb PATH or --data NAME=PATH)")
    names = list(datasets)
    jobs = [(m.strip(), False) for m in args.models.split(",") if m.strip()] + [(f, True) for f in args.fishai]
    if not jobs:
        raise BenchmarkError("nothing to score: pass --models and/or --fishai")
    models: dict = {}
    for spec, fishai in jobs:
        print(f"{spec}:", flush=True)
        try:
            models[spec] = score_model(spec, datasets, fishai=fishai, device=device, dtype=args.dtype,
                                       stride=args.stride, batch_size=args.batch_size,
                                       max_seq_len=args.max_seq_len, progress=not args.no_progress)
        except BenchmarkError as e:  # offline / not found / bad dir: report and go on with the rest
            msg = str(e).strip().splitlines()[0]
            print(f"error: {msg}", file=sys.stderr)
            models[spec] = {"error": msg}
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"device": device, "dtype": args.dtype, "stride": args.stride, "batch_size": args.batch_size,
                     "max_seq_len": args.max_seq_len, "split": args.split, "limit": args.limit,
                     "max_chars": args.max_chars, "detokenize": args.detokenize,
                     "datasets": {n: p for n, p in specs}},
        "datasets": names,
        "models": models,
        "published": {} if args.no_published else PUBLISHED,
        "dataset_errors": ds_errors,
    }
    print()
    print(format_table(models, names, res["published"]))
    if res["published"]:
        print("(published rows: the paper's own zero-shot figures with detokenizers, not measured here)")
    write_outputs(args, res, report_markdown)
    scored = sum("error" not in r for r in models.values())
    return 0 if scored else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
