"""
Train a byte-level BPE tokenizer (HF `tokenizers`) for FishAI models.

Usage (copy-paste):

    # from a text file / directory / jsonl / parquet / glob
    python tokenizer_train.py --data train_data.txt --vocab-size 32000 --output-dir tokenizer
    python tokenizer_train.py --data books/ corpus.jsonl --text-key content --vocab-size 16000 --output-dir tokenizer
    # no download needed: Python's bundled documentation
    python tokenizer_train.py --data python-docs --vocab-size 4096 --output-dir tokenizer
    # sample only the first 200 MB of a huge corpus, write the report as JSON
    python tokenizer_train.py --data "shards/*.parquet" --max-bytes 200M --output-dir tokenizer --json tok_report.json

The output directory (tokenizer.json, tokenizer_config.json with the ChatML chat template,
special_tokens_map.json) loads with `tokenizers.Tokenizer.from_file`, with
`transformers.AutoTokenizer.from_pretrained(dir)` and with `data_utils.load_tokenizer(dir)`.
Special ids are fixed: <|endoftext|>=0 (EOS / document separator), <|im_start|>=1,
<|im_end|>=2, <|pad|>=3.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from data_utils import (SPECIAL_TOKENS, DataError, TextTokenizer, atomic_write_text, _tokenizer_config,
                        iter_documents)

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def build_empty_tokenizer():
    """An untrained byte-level BPE: ByteLevel pre-tokenizer (no prefix space, GPT-2 regex), ByteLevel
    decoder, no normaliser, no unk token -> decode(encode(s)) == s for every string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    return tok


def _limit_bytes(texts: Iterable[str], max_bytes: int | None, counter: dict) -> Iterator[str]:
    """Pass documents through until max_bytes UTF-8 bytes were seen (the last one is cut)."""
    for t in texts:
        n = len(t.encode("utf-8"))
        if max_bytes is not None and counter["bytes"] + n > max_bytes:
            rest = max_bytes - counter["bytes"]
            if rest > 0:
                cut = t.encode("utf-8")[:rest].decode("utf-8", errors="ignore")
                counter["bytes"] += len(cut.encode("utf-8"))
                counter["docs"] += 1
                yield cut
            return
        counter["bytes"] += n
        counter["docs"] += 1
        yield t


def _holdout_split(texts: Iterable[str], every: int, held: list, held_max_bytes: int) -> Iterator[str]:
    """Every `every`-th document goes to the held-out slice (up to held_max_bytes) instead of
    training, so the compression figures are measured on unseen text."""
    held_bytes = 0
    for i, t in enumerate(texts):
        if every and i % every == every - 1 and held_bytes < held_max_bytes:
            held.append(t)
            held_bytes += len(t.encode("utf-8"))
            continue
        yield t


def compression_stats(tokenizer: TextTokenizer, texts: list[str]) -> dict:
    """bytes/token, chars/token and tokens/word (whitespace-separated words) on `texts`."""
    if not texts:
        return {"bytes": 0, "tokens": 0, "words": 0, "bytes_per_token": None, "tokens_per_word": None}
    ids = tokenizer.encode_batch(texts)
    n_tok = sum(len(x) for x in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_chars = sum(len(t) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    return {
        "docs": len(texts), "bytes": n_bytes, "chars": n_chars, "tokens": n_tok, "words": n_words,
        "bytes_per_token": round(n_bytes / max(n_tok, 1), 4),
        "chars_per_token": round(n_chars / max(n_tok, 1), 4),
        "tokens_per_word": round(n_tok / max(n_words, 1), 4) if n_words else None,
    }


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir, *, min_frequency: int = 2,
                    show_progress: bool = True, overwrite: bool = True, holdout_every: int = 0,
                    holdout_max_bytes: int = 2_000_000, max_bytes: int | None = None) -> dict:
    """Train a byte-level BPE on an iterable of documents (streamed; BPE keeps only word counts in
    memory) and save it to output_dir. Returns the report dict (vocab size, special ids, time,
    compression on the held-out slice when holdout_every > 0, else on the first training docs)."""
    from tokenizers import pre_tokenizers, trainers

    vocab_size = int(vocab_size)
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: need at least {MIN_VOCAB} "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; choose another --output-dir")
    if out.is_dir() and (out / "tokenizer.json").exists() and not overwrite:
        raise DataError(f"{out}: already contains a tokenizer; pass --overwrite to replace it")

    tok = build_empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # added first -> ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown input ever
        show_progress=show_progress,
    )
    counter = {"bytes": 0, "docs": 0}
    held: list[str] = []
    sample: list[str] = []

    def stream():
        for t in _holdout_split(_limit_bytes(texts, max_bytes, counter), holdout_every, held, holdout_max_bytes):
            if len(sample) < 200:
                sample.append(t)
            yield t

    t0 = time.time()
    tok.train_from_iterator(stream(), trainer=trainer)
    train_time = time.time() - t0
    if counter["docs"] == 0:
        raise DataError("no training text: the inputs contained no documents (empty files?)")
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise DataError(f"internal: special token {s} got id {tok.token_to_id(s)} instead of {i}")

    text_tok = TextTokenizer(tok.to_str(), _tokenizer_config())
    # write into a temp dir next to the target, then swap: a crash never leaves a half tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        text_tok.save(tmp)
        if out.is_dir():
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                os.replace(tmp / name, out / name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    eval_texts = held if held else sample
    report = {
        "output_dir": str(out),
        "vocab_size": text_tok.vocab_size,
        "requested_vocab_size": vocab_size,
        "special_tokens": {s: i for i, s in enumerate(SPECIAL_TOKENS)},
        "train_docs": counter["docs"] - len(held),
        "train_bytes": counter["bytes"] - sum(len(t.encode("utf-8")) for t in held),
        "train_time_s": round(train_time, 3),
        "compression_on": "held-out slice" if held else "training sample (no held-out docs)",
        "compression": compression_stats(text_tok, eval_texts),
        "hash": text_tok.hash,
    }
    return report


def parse_size(s: str | None) -> int | None:
    """'200M' -> 200_000_000; accepts K/M/G (powers of 1000) and plain integers."""
    if s is None:
        return None
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise DataError(f"--max-bytes: cannot parse {s!r}; use e.g. 500M or 2G") from None


def format_report(r: dict) -> str:
    c = r["compression"]
    lines = [
        f"tokenizer saved to {r['output_dir']}",
        f"  vocab size      : {r['vocab_size']} (requested {r['requested_vocab_size']})",
        "  special ids     : " + ", ".join(f"{k}={v}" for k, v in r["special_tokens"].items()),
        f"  trained on      : {r['train_docs']} docs, {r['train_bytes'] / 1e6:.2f} MB in {r['train_time_s']:.1f} s",
        f"  compression ({r['compression_on']}): {c.get('bytes_per_token')} bytes/token, "
        f"{c.get('tokens_per_word')} tokens/word over {c.get('bytes', 0) / 1e3:.0f} kB",
        f"  hash            : {r['hash'][:16]}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer (fixed special ids, ChatML template).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", required=True,
                   help="inputs: .txt/.md (blank-line blocks = documents), .jsonl, .parquet, directories, "
                        "globs, hf:NAME[:CONFIG][:SPLIT], or python-docs")
    p.add_argument("--vocab-size", type=int, default=32000, help="total vocabulary incl. 256 bytes and special tokens")
    p.add_argument("--output-dir", default="tokenizer", help="where tokenizer.json etc. are written")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--text-key", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--txt-mode", choices=["block", "line", "file"], default="block",
                   help="how .txt files split into documents")
    p.add_argument("--max-bytes", default=None, help="stop reading after this many bytes (e.g. 500M, 2G)")
    p.add_argument("--holdout-every", type=int, default=50,
                   help="every N-th document is held out to measure compression (0 = none)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip jsonl lines that are not JSON or lack the text field")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --output-dir")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        stats: dict = {}
        docs = iter_documents(args.data, text_key=args.text_key, skip_bad_lines=args.skip_bad_lines,
                              stats=stats, txt_mode=args.txt_mode)
        report = train_tokenizer(docs, args.vocab_size, args.output_dir, min_frequency=args.min_frequency,
                                 show_progress=not args.no_progress, overwrite=args.overwrite,
                                 holdout_every=args.holdout_every, max_bytes=parse_size(args.max_bytes))
        report["input_stats"] = stats
        print(format_report(report))
        if stats.get("bad_utf8_bytes"):
            print(f"  note: {stats['bad_utf8_bytes']} undecodable bytes were replaced by U+FFFD")
        if stats.get("bad_lines"):
            print(f"  note: {stats['bad_lines']} bad jsonl lines skipped")
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(report, indent=2, ensure_ascii=False))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
