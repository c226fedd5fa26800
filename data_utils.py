"""
FishAI data pipeline: the hold-out rule, filtering (DataFilter), mixing (DataMixer), tokenizing
raw text into .bin token files (`prepare`) or arrays (`tokenize_documents`), and the prepare/stats
commands. What it builds on sits in modules of its own: the tokenizer and chat template
(text_tokenizer.py), the readers (readers.py), token files, samplers and SFT data (token_data.py).

Usage (copy-paste):

    # tokenize raw text into data/{train,val}.bin + meta.json + data/tokenizer/
    python data_utils.py prepare --input books/ --tokenizer tokenizer/ --output data/
    # mix named sources with weights, filter, stop at a token budget
    python data_utils.py prepare --mix books=0.7:books/,code=0.3:code.jsonl \\
        --tokenizer tokenizer/ --output data/ --target-tokens 5000000 --filter default
    # inspect a token file
    python data_utils.py stats data/train.bin
    # throughput / memory benchmark (end to end vs bare encode_batch)
    python benchmark.py data --input books/ --tokenizer tokenizer/

Library use (see docs/API.md):

    from data_utils import prepare
    meta = prepare(["books/"], "tokenizer/", "data/")
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

import common
from common import (DataError, atomic_dir, write_json, run_cli, ArgumentParser, add_overwrite_flag,
                    add_quiet_flag, float_flag, int_flag, size_flag, EXIT_OK)
from readers import (JSONL_EXTS, PARQUET_EXTS, _expand_files, add_text_format_flags, check_not_binary,
                     iter_documents, one_block_note)
from text_tokenizer import ChatDocument, TextTokenizer, fast_encode_batch, load_tokenizer
from token_data import META_FORMAT, META_VERSION, TokenFileWriter, check_meta, token_dtype, token_file_stats


# ----------------------------------------------------------------------------------------------
# the hold-out rule: which documents the tokenizer, validation and test sets may share


HOLDOUT_RULE = (
    "The hold-out rule (data_utils.holdout_split, docs/DATA_FORMAT.md): with a held-out share f, document i "
    "(0-based, in reading order) is held out when ceil((i+1)*f) > ceil(i*f): exactly ceil(N*f) of N documents, "
    "evenly spread, the first one always among them (f = 0.05: the 1st, 21st, 41st, ...). A test share is "
    "taken the same way beside the validation share.")


def holdout_split(i: int, val_fraction: float = 0.0, test_fraction: float = 0.0) -> str:
    """'train', 'val' or 'test' for document i (0-based, in reading order) of a corpus. The one
    hold-out rule of the project (prepare, train.py on raw text and SFT, quick_train,
    tokenizer_train's compression report):

    document i is held out when ceil((i + 1) f) > ceil(i f), f = val_fraction + test_fraction,
    which spreads exactly ceil(N f) held-out documents evenly over any N, the first one included
    (so a small corpus still gets one); the k-th held-out document (k = ceil(i f)) goes to test
    when ceil((k + 1) t / f) > ceil(k t / f), t = test_fraction, else to val.

    So val and test never share a document with train or with each other; the tokenizer is
    trained on train and val documents and never sees a test document."""
    f = val_fraction + test_fraction
    if f <= 0 or _ceil((i + 1) * f) <= _ceil(i * f):
        return "train"
    if test_fraction <= 0:
        return "val"
    k, r = _ceil(i * f), test_fraction / f
    return "test" if _ceil((k + 1) * r) > _ceil(k * r) else "val"


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 30 * 0.1 is 3.0000000000000004 in floating point: still 3


# ----------------------------------------------------------------------------------------------
# DataFilter

# letters of the scripts the language filter knows; everything else that is a letter is "other"
_SCRIPT_RANGES = {
    "latin": "A-Za-z\u00C0-\u024F\u1E00-\u1EFF",
    "cjk": "\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF\uF900-\uFAFF\u31F0-\u31FF",
    "cyrillic": "\u0400-\u04FF",
    "greek": "\u0370-\u03FF",
    "arabic": "\u0600-\u06FF",
}
_LETTER_RE = re.compile(r"[^\W\d_]")
_DIGIT_RE = re.compile(r"\d")
# "special" = not a letter/digit/whitespace and not ordinary prose punctuation (ASCII or CJK).
# The filter counts the rare characters (special, foreign letters) with findall: scanning for
# what is rare is ~5x faster than counting what is common.
_SPECIAL_RE = re.compile(r"[^\w\s.,;:!?'\"()\-\u2018\u2019\u201C\u201D\u2014\u2013\u3000-\u303F\uFF00-\uFFEF]")
# Counting without scanning the whole text with Unicode regexes (3x faster, same counts): the
# ASCII part is counted on the UTF-8 bytes with bytes.translate (deletes all other bytes in one C
# pass); the few non-ASCII characters are collected once and matched with the regexes. The
# deletion tables are derived from the regexes, so both parts use the same definitions.
_NONASCII_RE = re.compile(r"[^\x00-\x7f]+")
_HIGH = bytes(range(128, 256))


def _keep_only(pred) -> bytes:
    return bytes(i for i in range(128) if not pred(chr(i))) + _HIGH


_DEL_BUT_SPECIAL = _keep_only(lambda ch: _SPECIAL_RE.match(ch) is not None)
_DEL_BUT_DIGIT = _keep_only(lambda ch: _DIGIT_RE.match(ch) is not None)
_DEL_BUT_LETTER = _keep_only(lambda ch: ch.isalpha())

FILTER_DEFAULTS = {
    "min_chars": 20, "max_chars": 2_000_000, "dedup": True, "scripts": ("latin", "cjk"), "min_script_ratio": 0.5,
    "max_special_ratio": 0.3, "max_digit_ratio": 0.3, "near_dedup": False, "near_dup_threshold": 0.8,
    "num_perm": 128, "bands": 16, "shingle": 5, "seed": 0,
}


def _count(regex: re.Pattern, text: str) -> int:
    # len() of the text with the matches removed: runs in C, much faster than findall
    return len(text) - len(regex.sub("", text))


class _U64Set:
    """Set of 64-bit hashes in one numpy array (open addressing, linear probing, load <= 1/2).
    Measured on 1M document hashes: 16.8 bytes per entry vs 69.5 for a Python set of ints (4x
    less, so exact de-duplication of tens of millions of documents fits in memory), at ~10 us per
    insert (about 1% of the encode time of a 2 KB document)."""

    def __init__(self, capacity: int = 1 << 16):
        self._t = np.zeros(capacity, dtype=np.uint64)
        self._mask = capacity - 1
        self.n = 0

    def add(self, h: int) -> bool:
        """Insert h; True if it was new."""
        h = h or 1  # 0 marks an empty slot
        t, mask = self._t, self._mask
        i = h & mask
        while True:
            v = int(t[i])
            if v == 0:
                t[i] = h
                self.n += 1
                if 2 * self.n > len(t):
                    self._grow()
                return True
            if v == h:
                return False
            i = (i + 1) & mask

    def __contains__(self, h: int) -> bool:
        h = h or 1
        t, mask = self._t, self._mask
        i = h & mask
        while True:
            v = int(t[i])
            if v == 0:
                return False
            if v == h:
                return True
            i = (i + 1) & mask

    def __len__(self) -> int:
        return self.n

    def _grow(self) -> None:
        old = self._t
        self._t = np.zeros(2 * len(old), dtype=np.uint64)
        self._mask = len(self._t) - 1
        self.n = 0
        for i in range(0, len(old), 1 << 16):  # in slices: no full-size temporary list of ints
            chunk = old[i:i + (1 << 16)]
            for h in chunk[chunk != 0].tolist():
                self.add(h)


class _MinHashLSH:
    """MinHash signatures of word 5-gram shingles (character 5-grams for text without spaces,
    e.g. Chinese) with banded LSH. Pure numpy; a candidate pair is confirmed with the estimated
    Jaccard similarity of the full signatures. (datasketch does the same, but it is one more
    dependency for an optional filter rule; this is 60 lines on numpy, already a dependency.)"""

    _MASK32 = np.uint64(0xFFFFFFFF)

    def __init__(self, num_perm=128, bands=16, threshold=0.8, shingle=5, seed=0):
        if num_perm % bands:
            raise DataError(f"near-dup: num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.num_perm, self.bands, self.rows = num_perm, bands, num_perm // bands
        self.threshold, self.shingle = threshold, shingle
        rng = np.random.default_rng([seed, 12345])
        self.a = (rng.integers(1, 2**63 - 1, size=num_perm, dtype=np.uint64) | np.uint64(1))[:, None]
        self.b = rng.integers(0, 2**63 - 1, size=num_perm, dtype=np.uint64)[:, None]
        self.tables: list[dict] = [dict() for _ in range(bands)]
        self.sigs: list[np.ndarray] = []

    def _shingles(self, text: str) -> np.ndarray:
        import zlib

        words = text.split()
        if len(words) < 3 * self.shingle and len(text) > 4 * len(words) + 20:  # no-space scripts
            units = [text[i:i + self.shingle] for i in range(max(1, len(text) - self.shingle + 1))]
            return np.unique(np.fromiter((zlib.crc32(u.encode("utf-8")) for u in units), dtype=np.uint64, count=len(units)))
        h = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
        k = min(self.shingle, max(1, len(h)))
        sh = np.zeros(max(1, len(h) - k + 1), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                sh = sh * np.uint64(0x100000001B3) + h[j:j + len(sh)]
        return np.unique(sh)

    def signature(self, text: str) -> np.ndarray:
        sh = self._shingles(text)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), 8192):  # chunks bound the (num_perm x chunk) matrix
                v = (self.a * sh[None, i:i + 8192] + self.b) >> np.uint64(32)
                np.minimum(sig, v.min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def is_duplicate_then_add(self, text: str) -> bool:
        sig = self.signature(text)
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for t, k in zip(self.tables, keys):
            j = t.get(k)
            if j is not None and j not in seen:
                seen.add(j)
                if float(np.mean(self.sigs[j] == sig)) >= self.threshold:
                    return True
        idx = len(self.sigs)
        self.sigs.append(sig)
        for t, k in zip(self.tables, keys):
            t.setdefault(k, idx)
        return False


class DataFilter:
    """Document filter with the seed's rules; every rule counts what it dropped.

    Rules, in order (cheap first): min_chars / max_chars (length bounds), max_digit_ratio
    (digits / chars), max_special_ratio (chars that are not letters, digits, whitespace or
    ordinary punctuation / chars), scripts + min_script_ratio (share of letters in the allowed
    scripts, e.g. latin and cjk), dedup (exact duplicates after whitespace normalisation and
    ASCII lower-casing, by 64-bit blake2b content hash, kept in a numpy hash table: 16-32 bytes
    per unique document), near_dedup (MinHash/LSH near-duplicates with estimated Jaccard >= near_dup_threshold).
    Any rule set to None is off.
    """

    RULES = ("too_short", "too_long", "digit_ratio", "special_ratio", "script", "duplicate", "near_duplicate")

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(FILTER_DEFAULTS)
        if unknown:
            raise DataError(f"--filter: unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(FILTER_DEFAULTS)}")
        self.cfg = {**FILTER_DEFAULTS, **kwargs}
        scripts = self.cfg["scripts"]
        if isinstance(scripts, str):
            scripts = tuple(s for s in scripts.replace("+", ",").split(",") if s)
        for s in scripts or ():
            if s not in _SCRIPT_RANGES:
                raise DataError(f"--filter scripts: unknown script '{s}'; choose from {', '.join(_SCRIPT_RANGES)}")
        self.cfg["scripts"] = tuple(scripts or ())
        # letters outside the allowed scripts: a word character that is not a digit/underscore/allowed letter
        allowed = "".join(_SCRIPT_RANGES[s] for s in self.cfg["scripts"])
        self._foreign_re = re.compile("[^\\W\\d_" + allowed + "]") if self.cfg["scripts"] else None
        # one scan for everything the ratio rules count (special chars, digits, foreign letters):
        # they are rare in normal text, so the per-rule counts then run on the few matches only
        self._latin_ok = "latin" in self.cfg["scripts"]
        self._hashes = _U64Set()
        self._lsh = (_MinHashLSH(self.cfg["num_perm"], self.cfg["bands"], self.cfg["near_dup_threshold"],
                                 self.cfg["shingle"], self.cfg["seed"]) if self.cfg["near_dedup"] else None)
        self.seen = 0
        self.kept = 0
        self.dropped = {r: 0 for r in self.RULES}

    @classmethod
    def from_spec(cls, spec: str | None) -> "DataFilter | None":
        """'none' -> None; 'default' -> defaults; 'min_chars=200,near_dedup=1,scripts=latin+cjk' ->
        defaults with those overrides (the CLI's --filter)."""
        if spec is None or spec.strip().lower() in ("", "none", "off"):
            return None
        kw: dict = {}
        for part in spec.split(","):
            part = part.strip()
            if not part or part == "default":
                continue
            if "=" not in part:
                raise DataError(f"--filter: expected key=value, got '{part}' (e.g. --filter min_chars=200,near_dedup=1)")
            k, v = (s.strip() for s in part.split("=", 1))
            if k not in FILTER_DEFAULTS:
                raise DataError(f"--filter: unknown option '{k}'; valid: {', '.join(FILTER_DEFAULTS)}")
            d = FILTER_DEFAULTS[k]
            if v.lower() in ("none", "off"):
                kw[k] = None
            elif isinstance(d, bool):
                kw[k] = v.lower() in ("1", "true", "yes", "on")
            elif k == "scripts":
                kw[k] = v
            else:
                try:
                    kw[k] = type(d)(float(v)) if isinstance(d, int) else float(v)
                except ValueError:
                    raise DataError(f"--filter: {k}={v} is not a number") from None
        return cls(**kw)

    def fresh_copy(self) -> "DataFilter":
        """Same rules, empty de-duplication state (used for up-sampled epochs)."""
        return DataFilter(**self.cfg)

    def reason(self, text: str) -> str | None:
        """The rule that rejects `text`, or None if it is kept (and then remembered for dedup)."""
        c = self.cfg
        n = len(text)
        if c["min_chars"] is not None and n < c["min_chars"]:
            return "too_short"
        if c["max_chars"] is not None and n > c["max_chars"]:
            return "too_long"
        b = text.encode("utf-8")
        hi = "".join(_NONASCII_RE.findall(text))  # usually a handful of quotes/dashes, or CJK
        if c["max_digit_ratio"] is not None:
            digits = len(b.translate(None, _DEL_BUT_DIGIT)) + (len(_DIGIT_RE.findall(hi)) if hi else 0)
            if digits > c["max_digit_ratio"] * n:
                return "digit_ratio"
        if c["max_special_ratio"] is not None:
            special = len(b.translate(None, _DEL_BUT_SPECIAL)) + (len(_SPECIAL_RE.findall(hi)) if hi else 0)
            if special > c["max_special_ratio"] * n:
                return "special_ratio"
        if self._foreign_re is not None and c["min_script_ratio"] is not None:
            foreign = len(self._foreign_re.findall(hi)) if hi else 0
            if not self._latin_ok:
                foreign += len(b.translate(None, _DEL_BUT_LETTER))  # ASCII letters are Latin
            if foreign and foreign > (1.0 - c["min_script_ratio"]) * _count(_LETTER_RE, text):
                return "script"
        # exact duplicates: whitespace runs collapsed and ASCII case folded, on the UTF-8 bytes
        if c["dedup"]:
            h = int.from_bytes(hashlib.blake2b(b" ".join(b.lower().split()), digest_size=8).digest(), "little")
            if not self._hashes.add(h):
                return "duplicate"
        if self._lsh is not None and self._lsh.is_duplicate_then_add(text):
            return "near_duplicate"
        return None

    def keep(self, text: str) -> bool:
        self.seen += 1
        r = self.reason(text)
        if r is None:
            self.kept += 1
            return True
        self.dropped[r] += 1
        return False

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        for d in docs:
            if self.keep(d):
                yield d

    def report(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "dropped": dict(self.dropped),
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.cfg.items()}}

    def format_report(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "nothing"
        return f"filter: kept {self.kept}/{self.seen} docs; dropped: {drops}"


# ----------------------------------------------------------------------------------------------
# DataMixer

class DataMixer:
    """Mix named document sources to target token shares, deterministically.

    sources: {name: (weight, source)} where source is anything iter_documents accepts, an iterable
    of strings, or a callable epoch -> iterator (so a source can be re-read when up-sampling).
    The next document comes from the active source furthest below its target share (ties broken
    by a seeded random order). Shares are in tokens: selection uses bytes x the source's
    tokens-per-byte, calibrated with count_tokens(text) on its first `calibrate_docs` documents
    (1/4 without count_tokens) - only data-dependent, so the mix is reproducible even when the
    caller encodes in another thread; the report uses the exact counts the caller gives to
    record(name, n_tokens, n_bytes) (prepare does), else the estimates.
    Stops at target_tokens / target_docs, or when every source is exhausted. A source that runs
    out is dropped from the mix and reported (the others fill its share); with upsample=True it is
    re-read instead, and its epoch count is reported.
    """

    def __init__(self, sources: dict, seed: int = 0, target_tokens: int | None = None,
                 target_docs: int | None = None, upsample: bool = False, text_key: str = "text",
                 max_epochs: int = 100, count_tokens=None, calibrate_docs: int = 32):
        if not sources:
            raise DataError("--mix: no sources given")
        self.names = list(sources)
        w = np.array([float(sources[n][0]) for n in self.names])
        if (w < 0).any() or w.sum() <= 0:
            raise DataError("--mix: weights must be >= 0 and not all 0")
        self.weights = w / w.sum()
        self.sources = {n: sources[n][1] for n in self.names}
        self.seed, self.target_tokens, self.target_docs = seed, target_tokens, target_docs
        self.upsample, self.text_key, self.max_epochs = upsample, text_key, max_epochs
        k = len(self.names)
        self.docs = np.zeros(k, dtype=np.int64)
        self.bytes = np.zeros(k, dtype=np.int64)
        self.tokens = np.zeros(k, dtype=np.int64)         # reported by record()
        self.recorded_bytes = np.zeros(k, dtype=np.int64)
        self.epochs = np.zeros(k, dtype=np.int64)         # completed passes over each source
        self.exhausted: dict[str, int] = {}               # name -> total docs mixed when it ran out
        self.count_tokens, self.calibrate_docs = count_tokens, calibrate_docs
        self.calib_tokens = np.zeros(k, dtype=np.int64)
        self.calib_bytes = np.zeros(k, dtype=np.int64)
        self.stop_reason = None
        self.read_stats: dict = {}

    def _open(self, i: int, epoch: int) -> Iterator[str]:
        src = self.sources[self.names[i]]
        if callable(src):
            return iter(src(epoch))
        if isinstance(src, (str, os.PathLike)):
            return iter_documents(src, self.text_key, stats=self.read_stats)
        if isinstance(src, (list, tuple)):
            return iter(src)  # an in-memory list of documents (re-iterable)
        if epoch > 0:
            raise DataError(f"--mix: source '{self.names[i]}' is a one-shot iterator and cannot be up-sampled")
        return iter(src)

    def _iter_single(self) -> Iterator[tuple[str, str]]:
        # one source, no token target: no share bookkeeping per document (it would cost more than
        # the reading in a fast pipeline); counts are still kept for the report
        # (bytes are taken from record() here: measuring them again would cost ~2% of the pipeline)
        name = self.names[0]
        n = 0
        try:
            for text in self._open(0, 0):
                if self.target_docs is not None and n >= self.target_docs:
                    self.stop_reason = "target_docs"
                    return
                n += 1
                yield name, text
            self.stop_reason = "sources_exhausted"
            if self.target_docs is not None:
                self.exhausted[name] = n
        finally:
            self.docs[0] += n
            self._single = True

    def est_tokens(self) -> np.ndarray:
        ratio = np.where(self.calib_bytes > 0, self.calib_tokens / np.maximum(self.calib_bytes, 1), 0.25)
        return self.bytes * ratio

    def record(self, name: str, n_tokens: int, n_bytes: int) -> None:
        """Exact token count of a mixed document, for the report (selection does not use it)."""
        i = self.names.index(name)
        self.tokens[i] += n_tokens
        self.recorded_bytes[i] += n_bytes

    def __iter__(self) -> Iterator[tuple[str, str]]:
        k = len(self.names)
        if k == 1 and self.target_tokens is None and not self.upsample:
            yield from self._iter_single()
            return
        its = [self._open(i, 0) for i in range(k)]
        active = [self.weights[i] > 0 for i in range(k)]
        tiebreak = np.random.default_rng(self.seed).permutation(k)  # seeded priority among equals
        rank = np.empty(k)
        rank[tiebreak] = np.arange(k) * 1e-9
        while True:
            if self.target_docs is not None and self.docs.sum() >= self.target_docs:
                self.stop_reason = "target_docs"
                return
            est = self.est_tokens()
            if self.target_tokens is not None and est.sum() >= self.target_tokens:
                self.stop_reason = "target_tokens"
                return
            if not any(active):
                self.stop_reason = "sources_exhausted"
                return
            w = np.where(active, self.weights, 0.0)
            w = w / w.sum()
            deficit = w * max(est.sum(), 1.0) - est - rank
            deficit[~np.array(active)] = -np.inf
            i = int(np.argmax(deficit))
            try:
                text = next(its[i])
            except StopIteration:
                if self.upsample and self.docs[i] > 0 and self.epochs[i] + 1 < self.max_epochs:
                    self.epochs[i] += 1  # start another pass over this source
                    its[i] = self._open(i, int(self.epochs[i]))
                else:
                    active[i] = False
                    # running out matters only if the mix was still supposed to take from it
                    if self.target_tokens is not None or self.target_docs is not None or any(active):
                        self.exhausted[self.names[i]] = int(self.docs.sum())
                continue
            self.docs[i] += 1
            nb = len(text.encode("utf-8"))
            self.bytes[i] += nb
            if self.count_tokens is not None and self.docs[i] <= self.calibrate_docs:
                self.calib_tokens[i] += self.count_tokens(text)
                self.calib_bytes[i] += nb
            yield self.names[i], text

    def report(self) -> dict:
        if getattr(self, "_single", False):
            self.bytes[0] = max(self.bytes[0], self.recorded_bytes[0])
        tok = self.tokens if self.tokens.sum() else self.est_tokens()
        total = max(float(tok.sum()), 1.0)
        rows = {}
        for i, n in enumerate(self.names):
            rows[n] = {"weight": round(float(self.weights[i]), 4), "docs": int(self.docs[i]), "bytes": int(self.bytes[i]),
                       "tokens": int(tok[i]), "share": round(float(tok[i]) / total, 4),
                       "passes": int(self.epochs[i]) + 1,  # >1 only when up-sampled
                       "exhausted": n in self.exhausted}
        return {"sources": rows, "stop_reason": self.stop_reason, "exhausted": dict(self.exhausted),
                "upsample": self.upsample, "target_tokens": self.target_tokens, "target_docs": self.target_docs}

    def format_report(self) -> str:
        r = self.report()
        lines = ["mix (target share -> achieved token share):"]
        for n, s in r["sources"].items():
            extra = ""
            if s["passes"] > 1:
                extra += f"  UP-SAMPLED: {s['passes']} passes (epochs)"
            if s["exhausted"]:
                extra += "  EXHAUSTED: ran out before the target" + ("" if self.upsample else " (not up-sampled; "
                                                                       "--upsample to repeat it)")
            lines.append(f"  {n:<10} {s['weight']:6.1%} -> {s['share']:6.1%}  ({s['tokens']:,} tokens, "
                         f"{s['docs']:,} docs){extra}")
        lines.append(f"  stopped: {r['stop_reason']}")
        return "\n".join(lines)


def parse_mix(spec: str) -> dict:
    """'web=0.5:data/web/,code=0.2:code.jsonl' -> {"web": (0.5, "data/web/"), ...}."""
    out = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)=([0-9.eE+-]+):(.+)$", part)
        if not m:
            raise DataError(f"--mix: cannot parse '{part}'; use name=weight:path[,name=weight:path...]")
        name, w, path = m.group(1), m.group(2), m.group(3)
        try:
            wf = float(w)
        except ValueError:
            raise DataError(f"--mix: weight '{w}' of '{name}' is not a number") from None
        if name in out:
            raise DataError(f"--mix: source name '{name}' given twice")
        out[name] = (wf, path)
    if not out:
        raise DataError("--mix: no sources given")
    return out


# ----------------------------------------------------------------------------------------------
# tokenizing raw text: one loop (tokenize_stream) for prepare (-> .bin files) and for train.py on
# raw text and quantize's calibration (-> arrays in memory, tokenize_documents)



def _batches(items: Iterator, max_docs: int, max_bytes: int) -> Iterator[list]:
    buf, nb = [], 0
    for it in items:
        buf.append(it)
        nb += len(it[1])
        if len(buf) >= max_docs or nb >= max_bytes:
            yield buf
            buf, nb = [], 0
    if buf:
        yield buf


def _prefetch(gen: Iterator, depth: int = 2) -> Iterator:
    """Run `gen` (reading + filtering + mixing, pure Python) up to `depth` items ahead in a worker
    thread, so it overlaps with encode_batch (Rust, releases the GIL) in the caller's thread. An
    exception in `gen` is raised here, at the item where it happened."""
    from concurrent.futures import ThreadPoolExecutor

    end = object()
    pool = ThreadPoolExecutor(max_workers=1)  # one worker: the next() calls run in order
    try:
        ahead = [pool.submit(next, gen, end) for _ in range(depth)]
        while (item := ahead.pop(0).result()) is not end:
            ahead.append(pool.submit(next, gen, end))
            yield item
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a consumer that stops early waits for nothing


class TokenBuffer:
    """An in-memory sink for tokenize_stream (the .bin files use TokenFileWriter)."""

    def __init__(self, vocab_size: int):
        self.dtype, self.parts, self.n_tokens = token_dtype(vocab_size), [], 0

    def write(self, tokens) -> None:
        self.parts.append(np.asarray(tokens).astype(self.dtype))
        self.n_tokens += len(self.parts[-1])

    def array(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=self.dtype)


def tokenize_stream(mixer, tok: TextTokenizer, sinks: dict, *, val_fraction: float = 0.0,
                    test_fraction: float = 0.0, batch_docs: int = 1024, batch_bytes: int = 4 << 20,
                    bar=None) -> dict:
    """The one raw-text tokenization loop. Documents from `mixer` ((source name, text) pairs) are
    read in a background thread, encoded in batches (encode_batch_fast), each followed by EOS, and
    appended to sinks[split] (objects with .write(ids)) by the hold-out rule (holdout_split); a
    split without a sink (e.g. test) is skipped. Returns documents per split and bytes read."""
    counts = {"train": 0, "val": 0, "test": 0, "bytes": 0}
    doc_index, eos = 0, tok.eos_id
    for batch in _prefetch(_batches(iter(mixer), batch_docs, batch_bytes)):
        encs = [e.ids for e in fast_encode_batch(tok.backend, [t for _, t in batch])]
        for j, (_, text) in enumerate(batch):
            if isinstance(text, ChatDocument):  # chat rows: control tokens from the template only
                encs[j] = tok.encode_chat(text.messages)[0]
        out_ids: dict[str, list[int]] = {s: [] for s in sinks}
        per_source: dict[str, list[int]] = {}
        batch_nbytes = 0
        for (name, text), ids in zip(batch, encs):
            nb = len(text.encode("utf-8"))
            acc = per_source.setdefault(name, [0, 0])
            acc[0] += len(ids) + 1
            acc[1] += nb
            split = holdout_split(doc_index, val_fraction, test_fraction)
            doc_index += 1
            batch_nbytes += nb
            counts[split] += 1
            if split in out_ids:
                out_ids[split].extend(ids)
                out_ids[split].append(eos)  # EOS after every document: separator, and what the model learns to emit
        for split, buf in out_ids.items():
            if buf:  # one write per batch and split: per-document numpy calls would cost ~10% here
                sinks[split].write(np.array(buf, dtype=np.int64))
        for name, (nt, nb) in per_source.items():
            mixer.record(name, nt, nb)
        counts["bytes"] += batch_nbytes
        if bar is not None:
            bar.update(batch_nbytes)
            bar.set_postfix_str(f"{doc_index:,} docs, {sum(s.n_tokens for s in sinks.values()):,} tok")
    return counts


def _local_files(sources) -> Iterator[Path | None]:
    """The files behind `sources` (nested lists flattened); None for a source that is a stream (hf:,
    python-docs, an iterable). A missing path raises DataError."""
    for s in sources:
        if isinstance(s, (list, tuple)):
            yield from _local_files(s)
        elif not isinstance(s, (str, os.PathLike)) or str(s) == "python-docs" or str(s).startswith("hf:"):
            yield None
        else:
            yield from _expand_files(str(s))


def check_sources(sources) -> None:
    """Before a progress bar starts: every local text file behind `sources` exists and is not one of
    the project's binary formats (16 bytes read per file; the UTF-8 share is checked as each is read)."""
    for f in _local_files(sources):
        if f is not None and f.suffix.lower() not in JSONL_EXTS + PARQUET_EXTS:
            check_not_binary(f)


def _input_bytes(sources) -> int | None:
    """Size of the local files behind `sources` (for the progress bar's percent and time left);
    None when a source is a stream (hf:, python-docs, an iterable) whose size is unknown."""
    try:
        files = list(_local_files(sources))
        return None if None in files else sum(f.stat().st_size for f in files)
    except (DataError, OSError):
        return None


def _progress_bar(show: bool, total: int | None, desc: str = "tokenizing"):
    if not show:
        return None
    from tqdm import tqdm
    # a known total gives percent and time left; file sizes include markup, so the bar ends near 100%
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, mininterval=0.5)


def make_mixer(inputs, mix, *, filter=None, text_key="text", skip_bad_lines=False, txt_mode="block",
               target_tokens=None, target_docs=None, upsample=False, seed=0, count_tokens=None):
    """The DataMixer over `mix` ({name: (weight, source)} or "name=weight:path,...") or, without
    it, over `inputs` as one source, each source read through iter_documents and the filter.
    Returns (mixer, filter or None, the fresh filters of up-sampled passes, read stats, sources)."""
    if isinstance(mix, str):
        mix = parse_mix(mix)
    flt = filter if isinstance(filter, DataFilter) or filter is None else DataFilter.from_spec(filter)
    read_stats: dict = {}
    fresh_filters: list[DataFilter] = []

    def make_source(src):
        def open_epoch(epoch: int):
            docs = iter_documents(src, text_key, skip_bad_lines=skip_bad_lines, stats=read_stats, txt_mode=txt_mode)
            if flt is None:
                return docs
            if epoch == 0:
                return flt(docs)
            f2 = flt.fresh_copy()  # repeated passes: same rules, dedup only within the pass
            fresh_filters.append(f2)
            return f2(docs)
        return open_epoch

    sources = mix if mix is not None else {"input": (1.0, list(inputs) if isinstance(inputs, (list, tuple)) else inputs)}
    mixer = DataMixer({n: (w, make_source(s) if not callable(s) else s) for n, (w, s) in sources.items()},
                      seed=seed, target_tokens=target_tokens, target_docs=target_docs, upsample=upsample,
                      count_tokens=count_tokens if (len(sources) > 1 or target_tokens) else None)
    return mixer, flt, fresh_filters, read_stats, sources


def tokenize_documents(source, tokenizer: TextTokenizer, *, val_fraction: float = 0.0, max_tokens: int | None = None,
                       text_key: str = "text", show_progress: bool = True, txt_mode: str = "block") -> dict:
    """Raw text (anything iter_documents reads, or a list of strings) -> {"train": ids, "val":
    ids} in memory, through the same loop as prepare (tokenize_stream): EOS after every document,
    val by the hold-out rule, at most about max_tokens tokens read (bounds HF streams)."""
    if tokenizer.eos_id is None:
        raise DataError("tokenizer has no <|endoftext|> token; re-train it with tokenizer_train.py")
    if isinstance(source, (str, os.PathLike)):
        inputs, mix = [source], None
        check_sources(inputs)
    else:  # documents in memory: a callable source is read as it is (no iter_documents)
        docs = list(source)
        inputs, mix = None, {"input": (1.0, lambda epoch: iter(docs))}
    mixer, *_ = make_mixer(inputs, mix, text_key=text_key, target_tokens=max_tokens, txt_mode=txt_mode,
                           count_tokens=lambda t: len(tokenizer.encode(t)))
    sinks = {"train": TokenBuffer(tokenizer.vocab_size), "val": TokenBuffer(tokenizer.vocab_size)}
    bar = _progress_bar(show_progress, None)
    try:
        tokenize_stream(mixer, tokenizer, sinks, val_fraction=val_fraction, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return {split: sink.array() for split, sink in sinks.items()}


PREPARED_NAMES = ("train.bin", "val.bin", "meta.json", "tokenizer")  # what prepare writes into --output


def prepared_output(out) -> common.Output:
    """prepare's --output: a folder of PREPARED_NAMES, replaced as a whole (atomic_dir)."""
    return common.Output(out, "--output", "prepared", owns={"train.bin": "tokens", "val.bin": "tokens",
                                                            "meta.json": "json", "tokenizer": "tokenizer"}, whole=True)


def output_plan(args) -> tuple[list, list]:
    """What each command writes and reads: prepare (its --output folder; checked again by prepare()
    itself, which other scripts call) and stats (--json)."""
    if args.cmd == "prepare":
        mixed = [p for _, p in parse_mix(args.mix).values()] if args.mix else None
        return [prepared_output(args.output)], [("--mix", mixed), ("--input", args.input), ("--tokenizer", args.tokenizer)]
    return [common.Output(args.json, "--json", "json")], [("files", args.files)]


def prepare(inputs=None, tokenizer=None, output="data", *, mix: str | dict | None = None,
            filter: str | DataFilter | None = None, val_fraction: float = 0.005, test_fraction: float = 0.0,
            overwrite: bool = False, workers: int | None = None, text_key: str = "text",
            skip_bad_lines: bool = False, target_tokens: int | None = None, target_docs: int | None = None,
            upsample: bool = False, seed: int = 0, txt_mode: str = "block", batch_docs: int = 1024,
            batch_bytes: int = 4 << 20, show_progress: bool = True, log=print) -> dict:
    """Tokenize inputs into output/{train.bin, val.bin, meta.json, tokenizer/}.

    inputs: sources for iter_documents (used as one source "input" when mix is None);
    mix: "name=weight:path,..." or {name: (weight, source)}; filter: "none" | "default" |
    "key=value,..." | DataFilter. Documents are split by the hold-out rule (holdout_split):
    val_fraction of them go to val.bin, test_fraction are left out (quick_train scores them).
    Everything is written into a temp dir next to `output` and renamed at the end (atomic_dir):
    an error or Ctrl-C leaves no partial output. Returns the meta dict (also written to meta.json).
    """
    if workers:
        # encode_batch's Rust thread pool reads this when it is first used
        os.environ.setdefault("RAYON_NUM_THREADS", str(int(workers)))
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise DataError("tokenizer has no <|endoftext|> token; re-train it with tokenizer_train.py")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"--val-fraction ({val_fraction}) and the test fraction ({test_fraction}) must be in "
                        "[0, 1) and leave documents for training")
    if mix is None and not inputs:
        raise DataError("no input: pass --input PATH... or --mix name=weight:path,...")
    mixer, flt, fresh_filters, read_stats, sources = make_mixer(
        inputs, mix, filter=filter, text_key=text_key, skip_bad_lines=skip_bad_lines, txt_mode=txt_mode,
        target_tokens=target_tokens, target_docs=target_docs, upsample=upsample, seed=seed,
        count_tokens=lambda t: len(tok.encode(t)))
    total = None if (target_tokens or target_docs) else _input_bytes([s for _, s in sources.values()])
    out = Path(output)
    named = [x for _, src in sources.values() for x in (src if isinstance(src, (list, tuple)) else [src])
             if isinstance(x, (str, os.PathLike))]
    common.check_plan([prepared_output(out)], [("--mix" if mix else "--input", named),  # before any work
                      ("--tokenizer", None if isinstance(tokenizer, TextTokenizer) else tokenizer)], overwrite)
    check_sources(named)
    t0 = time.time()
    with atomic_dir(out, overwrite, "--output", owns=PREPARED_NAMES, what="a prepared dataset") as tmp:
        writers = {s: TokenFileWriter(tmp / f"{s}.bin", tok.vocab_size, eos_id=tok.eos_id) for s in ("train", "val")}
        bar = _progress_bar(show_progress, total)
        try:
            counts = tokenize_stream(mixer, tok, writers, val_fraction=val_fraction, test_fraction=test_fraction,
                                     batch_docs=batch_docs, batch_bytes=batch_bytes, bar=bar)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        n_docs = counts["train"] + counts["val"] + counts["test"]
        if n_docs == 0:
            raise DataError("no documents left to tokenize: inputs are empty or everything was filtered out "
                            "(try --filter none)")
        if counts["train"] == 0:
            raise DataError(f"only {n_docs} document(s): nothing left for train.bin after the validation split; "
                            f"add data or use --val-fraction 0")
        for w in writers.values():
            w.close()
        tok.save(tmp / "tokenizer")
        meta = _prepare_meta(tok, writers, counts, time.time() - t0, sources, mixer, flt, fresh_filters,
                             read_stats, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        write_json(tmp / "meta.json", meta)
    if log:
        log(format_prepare_summary(meta, mixer, flt, out))
    return meta


def _prepare_meta(tok, writers, counts, seconds, sources, mixer, flt, fresh_filters, read_stats, **settings) -> dict:
    return {
        "format": META_FORMAT, "version": META_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "dtype": str(token_dtype(tok.vocab_size)),
        "train": {"file": "train.bin", "tokens": writers["train"].n_tokens, "docs": counts["train"]},
        "val": {"file": "val.bin", "tokens": writers["val"].n_tokens, "docs": counts["val"]},
        "test_docs_left_out": counts["test"],
        "bytes_in": counts["bytes"], "seconds": round(seconds, 3), **settings,
        "sources": {n: str(s) if not callable(s) else getattr(s, "__name__", "callable")
                    for n, (_, s) in sources.items()},
        "mix": mixer.report(),
        "filter": flt.report() if flt is not None else None,
        "upsampled_pass_filters": [f.report() for f in fresh_filters],
        "read_stats": read_stats,
    }


def format_prepare_summary(meta: dict, mixer: DataMixer | None = None, flt: DataFilter | None = None,
                           out=None) -> str:
    tot = meta["train"]["tokens"] + meta["val"]["tokens"]
    where = f"{out}/" if out is not None else ""
    lines = [
        f"wrote {where}train.bin ({meta['train']['tokens']:,} tokens, {meta['train']['docs']:,} docs), "
        f"val.bin ({meta['val']['tokens']:,} tokens, {meta['val']['docs']:,} docs)",
        f"  {meta['bytes_in'] / 1e6:.1f} MB in {meta['seconds']:.1f} s = {meta['bytes_in'] / 1e6 / max(meta['seconds'], 1e-9):.2f} MB/s, "
        f"{tot / max(meta['seconds'], 1e-9):,.0f} tokens/s; {meta['bytes_in'] / max(tot, 1):.2f} bytes/token",
        f"  tokenizer {meta['tokenizer_hash'][:12]} (vocab {meta['vocab_size']}), dtype {meta['dtype']}",
    ]
    rs = meta.get("read_stats") or {}
    if rs.get("bad_utf8_bytes"):
        lines.append(f"  note: {rs['bad_utf8_bytes']} undecodable bytes replaced by U+FFFD")
    if rs.get("bad_lines"):
        lines.append(f"  note: {rs['bad_lines']} bad jsonl lines skipped")
    if rs.get("empty_files"):
        lines.append(f"  note: {rs['empty_files']} empty file(s)")
    if note := one_block_note(rs):
        lines.append(f"  note: {note}")
    if flt is not None:
        lines.append("  " + flt.format_report())
    if mixer is not None and (len(mixer.names) > 1 or mixer.exhausted or mixer.upsample):
        lines.append("  " + mixer.format_report().replace("\n", "\n  "))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def prepare_command(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    prepare(args.input, args.tokenizer, args.output, mix=args.mix, filter=args.filter,
            val_fraction=args.val_fraction, overwrite=args.overwrite, workers=args.workers, text_key=args.text_key,
            skip_bad_lines=args.skip_bad_lines, target_tokens=args.target_tokens, target_docs=args.target_docs,
            upsample=args.upsample, seed=args.seed, txt_mode=args.txt_mode, batch_docs=args.batch_docs,
            show_progress=not args.quiet)
    return EXIT_OK


def stats_command(args) -> int:
    common.check_plan(*output_plan(args), args.overwrite)
    for p in args.files:
        st = token_file_stats(p)
        print(f"{p}: {st['n_tokens']:,} tokens, {st['docs_by_eos']:,} docs (EOS), "
              f"mean {st['mean_doc_tokens']} tokens/doc, dtype {st['dtype']}, vocab {st['vocab_size']}, "
              f"{st['distinct_ids']:,} distinct ids, {st['bytes'] / 1e6:.1f} MB")
        meta = Path(p).parent / "meta.json"
        tokdir = Path(p).parent / "tokenizer"
        top = st["top_ids"]
        if tokdir.is_dir():
            tok = load_tokenizer(tokdir)
            top = [[i, c, tok.decode([i])] for i, c in top]
            if meta.is_file():
                check_meta(Path(p).parent, tok)
                print("  meta.json matches data tokenizer/ (hash ok)")
        print("  top ids: " + ", ".join(f"{t[0]}{' ' + repr(t[2]) if len(t) > 2 else ''}:{t[1]:,}" for t in top))
        if args.json:
            write_json(args.json, st)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="FishAI data pipeline: tokenize raw text into token files, and inspect them. "
                       "(The prepare throughput benchmark is `python benchmark.py data`.)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)
    pp = sub.add_parser("prepare", help="tokenize raw text into train.bin/val.bin/meta.json/tokenizer/")
    pp.add_argument("--input", nargs="+", default=None,
                    help="txt/md (blank-line blocks = documents), jsonl, parquet, dirs, globs, hf:NAME[:CONFIG][:SPLIT], python-docs")
    pp.add_argument("--tokenizer", required=True, help="tokenizer dir (from tokenizer_train.py) or tokenizer.json")
    pp.add_argument("--output", required=True, help="output directory")
    pp.add_argument("--mix", default=None, help="weighted sources: name=weight:path,... (e.g. web=0.5:web/,code=0.2:code.jsonl)")
    pp.add_argument("--filter", default="none",
                    help="none | default | key=value,... overriding the defaults: " + ", ".join(f"{k}={v}" for k, v in FILTER_DEFAULTS.items()))
    pp.add_argument("--val-fraction", type=float_flag(0, 1, hi_open=True), default=0.005,
                    help="fraction of documents for val.bin (the hold-out rule: docs/DATA_FORMAT.md)")
    pp.add_argument("--target-tokens", type=size_flag, default=None, help="stop after about this many tokens (e.g. 50M)")
    pp.add_argument("--target-docs", type=size_flag, default=None, help="stop after this many documents (e.g. 100K)")
    pp.add_argument("--upsample", action="store_true", help="re-read sources that run out before the target (epochs reported)")
    pp.add_argument("--seed", type=int, default=0, help="mixing seed")
    add_text_format_flags(pp, "--input")
    pp.add_argument("--skip-bad-lines", action="store_true", help="skip jsonl lines that are not JSON or lack the text field")
    add_overwrite_flag(pp, "a non-empty --output directory")
    pp.add_argument("--workers", type=int_flag(1), default=None, help="encode threads (unset: all cores)")
    pp.add_argument("--batch-docs", type=int_flag(1), default=1024, help="documents per encode_batch call")
    add_quiet_flag(pp)
    pp.set_defaults(func=prepare_command)
    ps = sub.add_parser("stats", help="print header and statistics of .bin token files")
    ps.add_argument("files", nargs="+", help=".bin files")
    ps.add_argument("--json", default=None, metavar="PATH", help="write the (last file's) stats as JSON")
    add_overwrite_flag(ps, "an existing --json file")
    ps.set_defaults(func=stats_command)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
