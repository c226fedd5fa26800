"""
Train a byte-level BPE tokenizer (HF `tokenizers`) for FishAI models.

Usage (copy-paste):

    # from a text file / directory / jsonl / parquet / glob
    python tokenizer_train.py --data train_data.txt --vocab-size 32000 --output-dir tokenizer
    python tokenizer_train.py --data books/ corpus.jsonl --text-key content --vocab-size 16000 --output-dir tokenizer
    # chat jsonl (`messages` rows) is rendered with the ChatML template, as prepare does
    python tokenizer_train.py --data chats.jsonl --vocab-size 8192 --output-dir tokenizer
    # no download needed: Python's bundled documentation
    python tokenizer_train.py --data python-docs --vocab-size 4096 --output-dir tokenizer
    # sample only the first 200 MB of a huge corpus, write the report as JSON
    python tokenizer_train.py --data "shards/*.parquet" --max-bytes 200M --output-dir tokenizer --json tok_report.json

The output directory (tokenizer.json, tokenizer_config.json with the ChatML chat template,
special_tokens_map.json) loads with `tokenizers.Tokenizer.from_file`, with
`transformers.AutoTokenizer.from_pretrained(dir)` and with `text_tokenizer.load_tokenizer(dir)`.
It is built in a temp dir and swapped into place at the end (an existing tokenizer is only
replaced with --overwrite, and stays whole if the run fails). Special ids are fixed:
<|endoftext|>=0 (EOS / document separator), <|im_start|>=1, <|im_end|>=2, <|pad|>=3.

The compression report is measured on held-out documents (data_utils.holdout_split with
test_fraction = 1 / --holdout-every; the tokenizer never trains on them): bytes/token, and
tokens/word for text with spaces between words or characters/token for text without (Chinese).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import common
import data_utils
import readers
from common import DataError
from text_tokenizer import SPECIAL_TOKENS, TextTokenizer

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROGRESS_EVERY_S = 5.0       # seconds between progress lines when stderr is not a terminal (a log file)
SAMPLE_DOCS = 200            # first training documents kept for the report when nothing is held out


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(description="Train a byte-level BPE tokenizer (fixed special ids, ChatML template).")
    p.add_argument("--data", nargs="+", required=True,
                   help="inputs: text files (.txt, .md: blank-line blocks = documents), .jsonl (text or chat `messages` "
                        "rows), .parquet, directories, globs, hf:NAME[:CONFIG][:SPLIT], or python-docs")
    p.add_argument("--vocab-size", type=common.int_flag(MIN_VOCAB), default=32000,
                   help="total vocabulary incl. 256 bytes and special tokens")
    p.add_argument("--output-dir", default="tokenizer", help="where tokenizer.json etc. are written")
    p.add_argument("--min-frequency", type=common.int_flag(0), default=2, help="minimum pair count for a merge")
    readers.add_text_format_flags(p)
    p.add_argument("--max-bytes", type=_positive_size, default=None,
                   help="stop reading after this many bytes (e.g. 500M, 2G); default: read everything")
    p.add_argument("--holdout-every", type=_holdout_every, default=50,
                   help="hold out 1 in N documents to measure compression (0 = none)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip jsonl lines that are not JSON or lack the text field")
    common.add_overwrite_flag(p, "an existing tokenizer in --output-dir (and an existing --json file)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    common.add_quiet_flag(p)
    return p


def _positive_size(text) -> int:
    value = common.size_flag(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0 (e.g. 500M)")
    return value


def _holdout_every(text) -> int:
    value = common.int_flag(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 would hold out every document; use 0 (none) or N >= 2")
    return value


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


class _Reader:
    """The documents the trainer sees, in reading order: at most max_bytes UTF-8 bytes (the last
    document is cut), without the held-out ones (the shared hold-out rule, test_fraction =
    1 / holdout_every: the tokenizer never trains on them; the first held_max_bytes of them are kept
    for the compression report). Counts what it passed on and, with log set, reports progress."""

    def __init__(self, texts: Iterable[str], max_bytes: int | None, holdout_every: int, held_max_bytes: int,
                 log=None):
        self.texts, self.max_bytes, self.held_max_bytes, self.log = texts, max_bytes, held_max_bytes, log
        self.test_fraction = 1.0 / holdout_every if holdout_every else 0.0
        self.read_bytes = self.read_docs = self.train_bytes = self.train_docs = 0
        self.held_docs = self.held_bytes = 0
        self.held: list[str] = []
        self.sample: list[str] = []
        self.single_document = False

    def __iter__(self) -> Iterator[str]:
        t0 = last = time.monotonic()
        for i, (text, n) in enumerate(self._limited()):
            self.read_bytes += n
            self.read_docs += 1
            if self.log is not None and time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                self.log(self._progress(t0, "reading"))
            if data_utils.holdout_split(i, 0.0, self.test_fraction) == "test":
                self.held_docs += 1
                if self.held_bytes < self.held_max_bytes:
                    self.held.append(text)
                    self.held_bytes += n
                continue
            self.train_docs += 1
            self.train_bytes += n
            if len(self.sample) < SAMPLE_DOCS:
                self.sample.append(text)
            yield text
        if self.train_docs == 0 and self.held_docs == 1 and self.held:
            # one document (a file with no blank lines, a single text): train on it after all, and
            # measure the compression on its last 5% (cut at a line), which the trainer never sees
            text = self.held[0]
            cut = text.rfind("\n", 0, int(len(text) * 0.95)) + 1 or int(len(text) * 0.95)
            head, tail = text[:cut], text[cut:]
            self.held, self.single_document = ([tail] if tail.strip() else []), True
            self.held_docs, self.train_docs, self.train_bytes = len(self.held), 1, len(head.encode("utf-8"))
            self.sample = [head[:100_000]]
            yield head
        if self.log is not None:
            self.log(self._progress(t0, "read") + "; computing the merges")

    def _limited(self) -> Iterator[tuple[str, int]]:
        for text in self.texts:
            data = text.encode("utf-8")
            if self.max_bytes is not None and self.read_bytes + len(data) > self.max_bytes:
                cut = data[:self.max_bytes - self.read_bytes].decode("utf-8", errors="ignore")
                if cut:
                    yield cut, len(cut.encode("utf-8"))
                return
            yield text, len(data)

    def _progress(self, t0: float, verb: str) -> str:
        seconds = max(time.monotonic() - t0, 1e-9)
        mb = self.read_bytes / 1e6
        return (f"[tokenizer_train] {verb} {mb:,.1f} MB ({self.read_docs:,} docs) in {seconds:.0f} s, "
                f"{mb / seconds:.1f} MB/s")


def compression_stats(tokenizer: TextTokenizer, texts: list[str]) -> dict:
    """bytes/token and chars/token on `texts`; tokens/word (whitespace-separated words) only for
    text with spaces between words, None for text without (a Chinese paragraph is one "word")."""
    if not texts:
        return {"bytes": 0, "tokens": 0, "words": 0, "bytes_per_token": None, "tokens_per_word": None}
    n_tok = sum(len(x) for x in tokenizer.encode_batch(texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_chars = sum(len(t) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    spaced = readers.is_spaced(n_chars, n_words)
    return {
        "docs": len(texts), "bytes": n_bytes, "chars": n_chars, "tokens": n_tok, "words": n_words, "spaced": spaced,
        "bytes_per_token": round(n_bytes / max(n_tok, 1), 4),
        "chars_per_token": round(n_chars / max(n_tok, 1), 4),
        "tokens_per_word": round(n_tok / n_words, 4) if spaced else None,
    }


def _train_bpe(reader: _Reader, vocab_size: int, min_frequency: int, show_bar: bool):
    from tokenizers import pre_tokenizers, trainers

    tok = build_empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # added first -> ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown input ever
        show_progress=show_bar,
    )
    tok.train_from_iterator(reader, trainer=trainer)
    if reader.train_docs == 0 and reader.held_docs:
        raise DataError(f"no training text: all {reader.held_docs} documents were held out to measure compression; "
                        "pass --holdout-every 0 or give more documents")
    if reader.train_docs == 0:
        raise DataError("no training text: the inputs contained no documents (empty files?)")
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise DataError(f"internal: special token {s} got id {tok.token_to_id(s)} instead of {i}")
    return TextTokenizer(tok.to_str())  # default config: ChatML template, fixed special tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir, *, min_frequency: int = 2,
                    show_progress: bool = True, overwrite: bool = True, holdout_every: int = 0,
                    holdout_max_bytes: int = 2_000_000, max_bytes: int | None = None) -> dict:
    """Train a byte-level BPE on an iterable of documents (streamed; BPE keeps only word counts in
    memory) and save it to output_dir. Returns the report dict (vocab size, special ids, time,
    compression on the held-out documents when holdout_every > 0, else on the first training docs).
    Progress: the trainer's bar on a terminal, else a line on stderr every PROGRESS_EVERY_S seconds."""
    vocab_size = int(vocab_size)
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: need at least {MIN_VOCAB} "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    out = Path(output_dir)
    on_terminal = sys.stderr.isatty()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if show_progress and not on_terminal else None
    reader = _Reader(texts, max_bytes, holdout_every, holdout_max_bytes, log)
    # built in a temp dir beside `out` and swapped in at the end: a failure keeps the old tokenizer;
    # with --overwrite the directory may hold a tokenizer and nothing else (refused before any reading)
    with common.atomic_dir(out, overwrite, flag="--output-dir", owns=TOKENIZER_FILES, what="a tokenizer") as tmp:
        t0 = time.time()
        text_tok = _train_bpe(reader, vocab_size, min_frequency, show_progress and on_terminal)
        train_time = time.time() - t0
        text_tok.save(tmp)
    return {
        "output_dir": str(out),
        "vocab_size": text_tok.vocab_size,
        "requested_vocab_size": vocab_size,
        "special_tokens": {s: i for i, s in enumerate(SPECIAL_TOKENS)},
        "train_docs": reader.train_docs,
        "train_bytes": reader.train_bytes,
        "held_out_docs": reader.held_docs,
        "train_time_s": round(train_time, 3),
        "compression_on": ("the last 5% of the one document (never trained on)" if reader.single_document and reader.held
                           else "held-out slice" if reader.held else "training sample (no held-out docs)"),
        "compression": compression_stats(text_tok, reader.held or reader.sample),
        "hash": text_tok.hash,
    }


def format_report(r: dict) -> str:
    c = r["compression"]
    per_unit = (f"{c.get('tokens_per_word')} tokens/word" if c.get("spaced", True)
                else f"{c.get('chars_per_token')} chars/token (text without spaces between words)")
    return "\n".join([
        f"tokenizer saved to {r['output_dir']}",
        f"  vocab size      : {r['vocab_size']} (requested {r['requested_vocab_size']})",
        "  special ids     : " + ", ".join(f"{k}={v}" for k, v in r["special_tokens"].items()),
        f"  trained on      : {r['train_docs']} docs, {r['train_bytes'] / 1e6:.2f} MB in {r['train_time_s']:.1f} s"
        f" ({r.get('held_out_docs', 0)} held out)",
        f"  compression ({r['compression_on']}): {c.get('bytes_per_token')} bytes/token, {per_unit} "
        f"over {c.get('bytes', 0) / 1e3:.0f} kB",
        f"  hash            : {r['hash'][:16]}",
    ])


def output_plan(args) -> tuple[list, list]:
    """What tokenizer_command writes (a tokenizer folder, replaced as a whole; --json) and reads."""
    return ([common.Output(args.output_dir, "--output-dir", "tokenizer", owns=dict.fromkeys(TOKENIZER_FILES),
                           whole=True), common.Output(args.json, "--json", "json")], [("--data", args.data)])


def tokenizer_command(args) -> None:
    common.check_plan(*output_plan(args), args.overwrite)
    stats: dict = {}
    docs = readers.iter_documents(args.data, text_key=args.text_key, skip_bad_lines=args.skip_bad_lines,
                             stats=stats, txt_mode=args.txt_mode)
    report = train_tokenizer(docs, args.vocab_size, args.output_dir, min_frequency=args.min_frequency,
                             show_progress=not args.quiet, overwrite=args.overwrite,
                             holdout_every=args.holdout_every, max_bytes=args.max_bytes)
    report["input_stats"] = stats
    print(format_report(report))
    if stats.get("bad_utf8_bytes"):
        print(f"  note: {stats['bad_utf8_bytes']} undecodable bytes were replaced by U+FFFD")
    if stats.get("bad_lines"):
        print(f"  note: {stats['bad_lines']} bad jsonl lines skipped")
    if note := readers.one_block_note(stats):
        print(f"  note: {note}")
    common.write_outputs(args, report, say=False)


def main(argv=None) -> int:
    return common.run_cli(tokenizer_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
