"""Score reference models (Pythia, GPT-2, SmolLM2, any transformers causal LM) exactly like FishAI.

Every model goes through scoring.py's own `load_lm` and `perplexity` (imported, not copied), on
the same texts with the same windows, so the numbers sit side by side fairly: compare bits per byte
(the headline) and word-level perplexity (character-level for text without spaces, such as Chinese)
across models; token perplexity depends on the tokenizer.

Usage:
    # the four reference models on the HF test sets, next to a FishAI checkpoint
    python reference_benchmark.py --fishai checkpoints/fishai-best.pt

    # local data files (the shared copies), a subset of models, results as JSON
    python reference_benchmark.py --models gpt2,EleutherAI/pythia-70m --fishai checkpoints/fishai-best.pt \\
        --wikitext103 ../shared/data/wikitext103/wiki.test.tokens --wikitext2 ../shared/data/wikitext2/test.txt \\
        --ptb ../shared/data/ptb/ptb.valid.txt --json reference.json

    # any local directory saved with save_pretrained works as a model
    python reference_benchmark.py --models ./my-hf-model --data mytext=notes.txt --max-chars 200000

Offline (no hub access) a model that is not in the local cache prints a one-line error and the run
continues with the others. trust_remote_code is never used. The GPT-2 paper's own figures are shown
as "published" (zero-shot, with its detokenizers; not measured here).
"""
from __future__ import annotations

import gc
import sys
import time

import torch

import common
import scoring

DEFAULT_MODELS = ["EleutherAI/pythia-70m", "EleutherAI/pythia-160m", "gpt2", "HuggingFaceTB/SmolLM2-135M"]


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(description="Score reference LMs (Pythia, GPT-2, SmolLM2, ...) with scoring.py's "
                          "functions, side by side with FishAI models.",
                          epilog="usage examples:" + __doc__.split("Usage:")[1].split("Offline")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated transformers models: hub names or local dirs "
                        f"(default: {','.join(DEFAULT_MODELS)}); '' for none")
    p.add_argument("--fishai", action="append", default=[], metavar="PATH",
                   help="FishAI model to score alongside (.pt, .bin or FishAI HF dir); repeatable")
    common.add_device_flag(p)
    common.add_dtype_flag(p, "dtype the models run in; auto = bf16 on CUDA (fp16 where unsupported), fp32 on CPU")
    common.add_eval_text_flags(p)
    p.add_argument("--no-published", action="store_true", help="do not show the published GPT-2 figures")
    common.add_output_flags(p)
    return p


PUBLISHED = {
    "gpt2 (published, GPT-2 paper)": {
        "source": "Radford et al. 2019, Table 3 (117M, zero-shot, detokenized)",
        "word_ppl": {"wikitext2": 29.41, "wikitext103": 37.50, "ptb": 65.85},
    },
}


def score_model(spec: str, datasets: dict, *, fishai: bool, device: str, dtype, stride, batch_size: int,
                max_seq_len, progress: bool) -> dict:
    """Load one model through scoring.load_lm and run scoring.perplexity on every dataset."""
    lm = scoring.load_lm(spec, device=device, dtype=dtype, hf=not fishai, max_seq_len=max_seq_len)
    try:
        s = stride if stride is None else min(int(stride), lm.max_seq_len)
        params = sum(p.numel() for p in lm.model.parameters())
        out = {"kind": lm.kind, "params": params, "max_seq_len": lm.max_seq_len, "begin_id": lm.begin_id,
               "stride": s or lm.max_seq_len, "perplexity": {}}
        for name, docs in datasets.items():
            r = scoring.perplexity(lm, docs, stride=s, batch_size=batch_size, progress=progress)
            out["perplexity"][name] = r
            print("  " + scoring.describe_ppl(scoring.DATASET_LABELS.get(name, name), r), flush=True)
        return out
    finally:
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _ppl_cell(r: dict | None) -> str:
    """A dataset's headline perplexity with its unit ("35.21 word", "4.20 char"), or n/a."""
    if r is None:
        return "n/a"
    value, per = scoring.headline_ppl(r)
    return f"{scoring.fmt_ppl(value)} {per}"


def format_table(models: dict, names: list[str], published: dict | None) -> str:
    """Side-by-side table: bits/byte and word (or char) PPL per dataset, one row per model."""
    head = f"{'model':<36}{'params':>9}{'ctx':>6}"
    for n in names:
        head += f"{scoring.DATASET_LABELS.get(n, n)[:12] + ' bpb':>17}{'PPL':>16}"
    lines = [head]
    for spec, r in models.items():
        row = f"{spec[-36:]:<36}"
        if "error" in r:
            lines.append(row + f"  not scored: {r['error'][:80]}")
            continue
        row += f"{r['params'] / 1e6:>8.1f}M{r['max_seq_len']:>6}"
        for n in names:
            p = r["perplexity"].get(n)
            bpb = f"{p['bits_per_byte']:.4f}" if p else "n/a"
            row += f"{bpb:>17}{_ppl_cell(p):>16}"
        lines.append(row)
    for label, pub in (published or {}).items():
        row = f"{label[-36:]:<36}{'':>9}{'':>6}"
        for n in names:
            v = pub["word_ppl"].get(n)
            row += f"{'-':>17}{(f'{v:.2f} word' if v is not None else '-'):>16}"
        lines.append(row)
    return "\n".join(lines)


def _published_markdown(res: dict, names: list[str]) -> list[str]:
    out = []
    for label, pub in res.get("published", {}).items():
        cells = []
        for n in names:
            v = pub["word_ppl"].get(n)
            cells += ["-", f"{v:.2f} word" if v is not None else "-", "-"]
        out.append(f"| {label} | 124M | 1024 | " + " | ".join(cells) + " |")
    if out:
        out += ["", "Published rows are the papers' own figures (zero-shot, with their detokenizers), "
                "not measured here; they used detokenized text and their own word counts."]
    return out


def report_markdown(res: dict) -> str:
    names = res["datasets"]
    labels = [scoring.DATASET_LABELS.get(n, n) for n in names]
    out = ["# Reference models scored like FishAI", "",
           f"{res['date']}; device {res['settings']['device']}; stride "
           f"{res['settings']['stride'] or 'context length (disjoint windows)'}; every model is scored by "
           "scoring.py's perplexity() on the same texts (word, character and byte counts from the original "
           "text). PPL is per word for spaced text, per character (char) for text without spaces.", "",
           "| model | params | context | " + " | ".join(
               f"{lab} bits/byte | {lab} PPL | {lab} token PPL" for lab in labels) + " |",
           "|---|---:|---:|" + "---:|" * (3 * len(names))]
    for spec, r in res["models"].items():
        if "error" in r:
            out.append(f"| {spec} | not scored: {r['error']} |" + " |" * (1 + 3 * len(names)))
            continue
        cells = []
        for n in names:
            p = r["perplexity"].get(n)
            cells += ([f"{p['bits_per_byte']:.4f}", _ppl_cell(p), scoring.fmt_ppl(p["token_ppl"])] if p
                      else ["n/a"] * 3)
        out.append(f"| {spec} ({r['kind']}) | {r['params'] / 1e6:.1f}M | {r['max_seq_len']} | "
                   + " | ".join(cells) + " |")
    out += _published_markdown(res, names)
    for name, msg in res.get("dataset_errors", {}).items():
        out.append(f"- dataset {name}: not scored: {msg}")
    return "\n".join(out) + "\n"


def _score_all(args, datasets: dict, device: str) -> dict:
    """Every --models / --fishai spec -> its score_model() result, or {"error": message} when it
    cannot be loaded (offline, not found, bad directory): the run goes on with the others."""
    jobs = [(m.strip(), False) for m in args.models.split(",") if m.strip()] + [(f, True) for f in args.fishai]
    if not jobs:
        raise scoring.ScoringError("nothing to score: pass --models and/or --fishai")
    models: dict = {}
    for spec, is_fishai in jobs:
        print(f"{spec}:", flush=True)
        try:
            models[spec] = score_model(spec, datasets, fishai=is_fishai, device=device, dtype=args.dtype,
                                       stride=args.stride, batch_size=args.batch_size,
                                       max_seq_len=args.max_seq_len, progress=not args.quiet)
        except scoring.ScoringError as e:
            print(f"error: {common.one_line(e)}", file=sys.stderr)
            models[spec] = {"error": common.one_line(e)}
    return models


def output_plan(args) -> tuple[list, list]:
    """What compare_command writes (--json, --report) and reads (the local datasets and model dirs)."""
    return common.result_outputs(args), [*common.eval_text_inputs(args), ("--models", args.models.split(","))]


def compare_command(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    device = str(common.resolve_device(args.device))
    specs = scoring.parse_data_flags(args)
    ds_errors: dict = {}
    datasets = scoring.load_datasets(specs, split=args.split, limit=args.limit, errors=ds_errors,
                               max_chars=args.max_chars, detokenize=args.detokenize)
    for msg in ds_errors.values():
        print(f"error: {msg}", file=sys.stderr)
    if not datasets:
        raise scoring.ScoringError("no dataset could be loaded; pass local files (--wikitext103 PATH, --wikitext2 PATH, "
                               "--ptb PATH or --data NAME=PATH)")
    models = _score_all(args, datasets, device)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"device": device, "dtype": args.dtype, "stride": args.stride, "batch_size": args.batch_size,
                     "max_seq_len": args.max_seq_len, "split": args.split, "limit": args.limit,
                     "max_chars": args.max_chars, "detokenize": args.detokenize,
                     "datasets": {n: p for n, p in specs}},
        "datasets": list(datasets),
        "models": models,
        "published": {} if args.no_published else PUBLISHED,
        "dataset_errors": ds_errors,
    }
    print()
    print(format_table(models, res["datasets"], res["published"]))
    if res["published"]:
        print("(published rows: the paper's own zero-shot figures with detokenizers, not measured here)")
    common.write_outputs(args, res, report_markdown)
    return common.EXIT_OK if any("error" not in r for r in models.values()) else common.EXIT_FAILED


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_cli(compare_command, args)


if __name__ == "__main__":
    sys.exit(main())
