"""
Token data: the .bin token files (header, writer, memory-mapped reader; spec in
docs/DATA_FORMAT.md), the samplers and batches train.py draws from them, the prepared folder's
meta check, and the SFT chat dataset (assistant-only loss masks, packing).

    from token_data import read_token_file, TokenWindowSampler
    tokens = read_token_file("data/train.bin")
    sampler = TokenWindowSampler(tokens, seq_len=256, batch_size=8, seed=0)
    x, y = sampler.next_batch()
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

import common
from common import IGNORE_INDEX, DataError, atomic_output
from readers import _bump, iter_jsonl, normalize_conversation
from text_tokenizer import EOS_ID, TextTokenizer, load_tokenizer

META_FORMAT = "fishai-data"  # meta.json of a prepared folder
META_VERSION = 1

# ----------------------------------------------------------------------------------------------
# .bin token files (spec: docs/DATA_FORMAT.md)

BIN_MAGIC = common.TOKENS_MAGIC  # the first bytes of a token file
BIN_VERSION = 1
BIN_HEADER_SIZE = 64
_HEADER_STRUCT = struct.Struct("<8sIIQQQ")  # magic, version, dtype code, n_tokens, vocab_size, n_docs
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    return _DTYPES[2] if vocab_size <= 65535 else _DTYPES[4]


def _pack_header(n_tokens: int, vocab_size: int, n_docs: int) -> bytes:
    dt = token_dtype(vocab_size)
    h = _HEADER_STRUCT.pack(BIN_MAGIC, BIN_VERSION, dt.itemsize, n_tokens, vocab_size, n_docs)
    return h + b"\x00" * (BIN_HEADER_SIZE - len(h))


class TokenFileWriter:
    """Streaming .bin writer: append chunks, then close() writes the final header and renames the
    temp file into place (atomic_output); abort() (or an exception inside `with`) leaves nothing."""

    def __init__(self, path, vocab_size: int, eos_id: int | None = EOS_ID):
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.eos_id = eos_id
        self.n_tokens = 0
        self.n_docs = 0
        self._out = atomic_output(self.path)
        self._f = open(self._out.__enter__(), "wb")
        self._f.write(_pack_header(0, self.vocab_size, 0))

    def write(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise DataError(f"{self.path}: token id {int(arr.max()) if arr.max() >= self.vocab_size else int(arr.min())} "
                            f"outside the vocabulary [0, {self.vocab_size}); wrong --tokenizer?")
        if self.eos_id is not None:
            self.n_docs += int(np.count_nonzero(arr == self.eos_id))
        self._f.write(arr.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += int(arr.size)

    def close(self) -> Path:
        self._f.seek(0)
        self._f.write(_pack_header(self.n_tokens, self.vocab_size, self.n_docs))
        self._f.close()
        self._out.__exit__(None, None, None)  # fsync + rename into place
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._out.__exit__(DataError, DataError("aborted"), None)  # removes the temp file

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_token_file(path, token_iter: Iterable, vocab_size: int) -> int:
    """Write a .bin token file atomically from chunks of ids (lists or numpy arrays; a plain int is
    a chunk of one). Returns the number of tokens written."""
    with TokenFileWriter(path, vocab_size) as w:
        for chunk in token_iter:
            w.write(np.atleast_1d(chunk))
        return w.n_tokens


def read_token_header(path) -> dict:
    """Parse and check the header of a .bin token file; DataError naming the file on any problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(BIN_HEADER_SIZE)
    except OSError as e:
        raise DataError(f"{path}: cannot read token file ({e.strerror}); run `python data_utils.py prepare` first") from None
    if len(raw) < BIN_HEADER_SIZE or raw[:8] != BIN_MAGIC:
        raise DataError(f"{path}: not a FishAI token file (bad magic/header); re-create it with "
                        f"`python data_utils.py prepare`")
    magic, version, code, n_tokens, vocab_size, n_docs = _HEADER_STRUCT.unpack(raw[:_HEADER_STRUCT.size])
    if version != BIN_VERSION:
        raise DataError(f"{path}: token file version {version}, this code reads version {BIN_VERSION}; re-run prepare")
    if code not in _DTYPES or _DTYPES[code] != token_dtype(vocab_size):
        raise DataError(f"{path}: invalid dtype code {code} for vocab size {vocab_size}; the file is corrupt, re-run prepare")
    expected = BIN_HEADER_SIZE + n_tokens * code
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataError(f"{path}: {what} ({size} bytes, header says {expected}); re-run prepare")
    return {"version": version, "dtype": str(_DTYPES[code]), "itemsize": code, "n_tokens": n_tokens,
            "vocab_size": vocab_size, "n_docs": n_docs, "bytes": size}


def read_token_file(path) -> np.memmap:
    """Memory-map the tokens of a .bin file (header checked). Returns a read-only np.memmap."""
    h = read_token_header(path)
    if h["n_tokens"] == 0:
        return np.zeros(0, dtype=_DTYPES[h["itemsize"]])
    return np.memmap(path, dtype=_DTYPES[h["itemsize"]], mode="r", offset=BIN_HEADER_SIZE, shape=(h["n_tokens"],))


# ----------------------------------------------------------------------------------------------
# training / eval datasets over token arrays


def _as_tokens(tokens) -> np.ndarray:
    if isinstance(tokens, (str, os.PathLike)):
        return read_token_file(tokens)
    if hasattr(tokens, "numpy") and not isinstance(tokens, np.ndarray):
        tokens = tokens.cpu().numpy()
    return np.asarray(tokens)


def _to_device(arr: np.ndarray, device):
    import torch

    t = torch.from_numpy(arr.astype(np.int64, copy=False))
    dev = torch.device(device)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


class TokenWindowSampler:
    """Random windows of seq_len+1 tokens -> (x, y) for pretraining.

    Batch i of rank r depends only on (seed, rank, i): resuming from state_dict() replays exactly
    the batches an uninterrupted run would have seen, and ranks draw independent windows.
    """

    def __init__(self, tokens, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.tokens = _as_tokens(tokens)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.step = 0
        if self.seq_len < 1 or self.batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        if len(self.tokens) < self.seq_len + 1:
            raise DataError(f"token data has {len(self.tokens)} tokens, need at least seq_len+1 = {self.seq_len + 1}; "
                            f"use more data or a smaller --seq-len")
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    def batch_indices(self, step: int) -> np.ndarray:
        """Window start positions of batch `step` for this rank, in [0, len - seq_len - 1]."""
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def get_batch(self, step: int) -> np.ndarray:
        starts = self.batch_indices(step)
        return np.asarray(self.tokens[starts[:, None] + self._offsets[None, :]], dtype=np.int64)

    def next_batch(self, device="cpu"):
        buf = self.get_batch(self.step)
        self.step += 1
        return _to_device(np.ascontiguousarray(buf[:, :-1]), device), _to_device(np.ascontiguousarray(buf[:, 1:]), device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.seed = int(d["seed"])
        self.step = int(d["step"])


def iter_eval_batches(tokens, seq_len: int, batch_size: int, max_batches: int | None = None, device="cpu"):
    """Contiguous, non-overlapping windows: window k covers tokens[k*T : k*T + T + 1]. The last
    batch may be smaller; a tail shorter than one window is dropped."""
    tokens = _as_tokens(tokens)
    n_windows = (len(tokens) - 1) // seq_len if len(tokens) > 1 else 0
    offsets = np.arange(seq_len + 1, dtype=np.int64)
    n_batches = 0
    for b0 in range(0, n_windows, batch_size):
        if max_batches is not None and n_batches >= max_batches:
            return
        starts = np.arange(b0, min(b0 + batch_size, n_windows), dtype=np.int64) * seq_len
        buf = np.asarray(tokens[starts[:, None] + offsets[None, :]], dtype=np.int64)
        n_batches += 1
        yield _to_device(np.ascontiguousarray(buf[:, :-1]), device), _to_device(np.ascontiguousarray(buf[:, 1:]), device)


def check_meta(data_dir, tokenizer, path=None) -> dict:
    """Check that a prepared data dir was tokenized with `tokenizer` (a TextTokenizer, a dict from
    to_dict(), or a tokenizer path); raises DataError naming both hashes otherwise.
    data_dir: the directory (or its meta.json), or an already loaded meta dict (then `path` names
    the directory in messages). Returns the meta dict."""
    if isinstance(data_dir, dict):
        meta = data_dir
        d = Path(path) if path is not None else Path(".")
        mp = d / "meta.json"
    else:
        d = Path(data_dir)
        mp = d / "meta.json" if d.is_dir() else d
        if mp.name == "meta.json" and not d.is_dir():
            d = mp.parent
        if not mp.is_file():
            raise DataError(f"{mp}: no meta.json; create the data with `python data_utils.py prepare --output {d}`")
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{mp}: unreadable meta.json ({e}); re-run prepare") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{mp}: not a FishAI data meta.json; re-run `python data_utils.py prepare`")
    if isinstance(tokenizer, dict):
        tokenizer = TextTokenizer.from_dict(tokenizer)
    elif not isinstance(tokenizer, TextTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if meta.get("vocab_size") != tokenizer.vocab_size or meta.get("tokenizer_hash") != tokenizer.hash:
        raise DataError(f"{mp}: data was tokenized with a different tokenizer (hash {str(meta.get('tokenizer_hash'))[:12]}, "
                        f"vocab {meta.get('vocab_size')}) than the one given (hash {tokenizer.hash[:12]}, vocab "
                        f"{tokenizer.vocab_size}); re-run prepare with this tokenizer or use {d / 'tokenizer'}")
    return meta


def token_file_stats(path, top: int = 10) -> dict:
    """Header fields plus document count/length and the most frequent ids (chunked pass)."""
    h = read_token_header(path)
    toks = read_token_file(path)
    counts = np.zeros(h["vocab_size"], dtype=np.int64)
    for i in range(0, len(toks), 1 << 24):
        counts += np.bincount(np.asarray(toks[i:i + (1 << 24)]), minlength=h["vocab_size"])[: h["vocab_size"]]
    used = int(np.count_nonzero(counts))
    order = np.argsort(-counts)[:top]
    docs = int(counts[EOS_ID]) if h["vocab_size"] > EOS_ID else 0
    return {**h, "path": str(path), "docs_by_eos": docs,
            "mean_doc_tokens": round(h["n_tokens"] / docs, 1) if docs else None,
            "distinct_ids": used, "top_ids": [[int(i), int(counts[i])] for i in order if counts[i]]}


# ----------------------------------------------------------------------------------------------
# SFT chat data

def read_sft_jsonl(path, skip_bad_lines: bool = False, stats: dict | None = None) -> list[list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: SFT data file not found")
    convs = []
    for lineno, row in iter_jsonl(path, skip_bad_lines, stats):
        try:
            convs.append(normalize_conversation(row))
        except DataError as e:
            if not skip_bad_lines:
                raise DataError(f"{path}:{lineno}: {e}; fix the line or pass --skip-bad-lines") from None
            _bump(stats, "bad_lines")
    if not convs:
        raise DataError(f"{path}: no conversations found")
    return convs


class SFTDataset:
    """Chat data for supervised fine-tuning.

    Each conversation is rendered with ChatML (TextTokenizer.encode_chat); loss_mask is 1 only
    on targets that are assistant content tokens or the assistant's closing <|im_end|>.
    With pack=True several whole conversations share one row of seq_len tokens; doc_ids (B, T)
    numbers the conversations within the row (0, 1, 2, ...; padding gets the next number) so
    model.forward(..., doc_ids=...) can block attention between them and restart RoPE positions.
    Targets never cross a conversation boundary. Padding: x = pad id, y = IGNORE_INDEX, mask 0.
    Conversations longer than seq_len + 1 tokens are truncated (counted in .stats).
    Order: a seeded permutation per epoch, rank r takes every world_size-th conversation;
    state_dict()/load_state_dict() give exact resume.
    """

    def __init__(self, path_or_conversations, tokenizer: TextTokenizer, seq_len: int, batch_size: int,
                 pack: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 skip_bad_lines: bool = False):
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.pack = bool(pack)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.stats: dict = {"conversations": 0, "truncated": 0, "dropped_no_assistant": 0}
        if isinstance(path_or_conversations, (str, os.PathLike)):
            convs = read_sft_jsonl(path_or_conversations, skip_bad_lines, self.stats)
        else:
            convs = [normalize_conversation(c) for c in path_or_conversations]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        for msgs in convs:
            if not any(m["role"] == "assistant" for m in msgs):
                self.stats["dropped_no_assistant"] += 1
                continue
            ids, mask = tokenizer.encode_chat(msgs)
            if len(ids) > self.seq_len + 1:
                ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]
                self.stats["truncated"] += 1
            if sum(mask[1:]) == 0:
                self.stats["dropped_no_assistant"] += 1
                continue
            self.samples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)))
        self.stats["conversations"] = len(self.samples)
        if len(self.samples) < self.world_size:
            raise DataError(f"SFT data has {len(self.samples)} usable conversations (with an assistant reply), "
                            f"need at least {self.world_size}")
        self.epoch = 0
        self.cursor = 0
        self.step = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.samples)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        return perm[self.rank::self.world_size]

    def _next_sample(self) -> int:
        if self.cursor >= len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order(self.epoch)
        i = int(self._order[self.cursor])
        self.cursor += 1
        return i

    def _peek_len(self) -> int:
        if self.cursor >= len(self._order):
            order = self._epoch_order(self.epoch + 1)
            return len(self.samples[int(order[0])][0]) - 1
        return len(self.samples[int(self._order[self.cursor])][0]) - 1

    def next_batch(self, device="cpu"):
        T, B = self.seq_len, self.batch_size
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        lm = np.zeros((B, T), dtype=np.int64)
        doc = np.zeros((B, T), dtype=np.int64)
        for b in range(B):
            pos, k = 0, 0
            while True:
                n = self._peek_len()
                if pos > 0 and (not self.pack or pos + n > T):
                    break
                ids, mask = self.samples[self._next_sample()]
                x[b, pos:pos + n] = ids[:-1]
                y[b, pos:pos + n] = ids[1:]
                lm[b, pos:pos + n] = mask[1:]
                doc[b, pos:pos + n] = k
                pos += n
                k += 1
                if not self.pack:
                    break
            doc[b, pos:] = k  # padding is its own segment: it never attends to real tokens
        self.step += 1
        return _to_device(x, device), _to_device(y, device), _to_device(lm, device), _to_device(doc, device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.seed = int(d["seed"])
        self.epoch = int(d["epoch"])
        self.cursor = int(d["cursor"])
        self.step = int(d.get("step", 0))
        self._order = self._epoch_order(self.epoch)


