"""
FishAI data pipeline: readers, tokenizer wrapper, filtering, mixing, .bin token files and
the datasets train.py uses.

Usage (copy-paste):

    # tokenize raw text into data/{train,val}.bin + meta.json + data/tokenizer/
    python data_utils.py prepare --input books/ --tokenizer tokenizer/ --output data/
    # mix named sources with weights, filter, stop at a token budget
    python data_utils.py prepare --mix books=0.7:books/,code=0.3:code.jsonl \\
        --tokenizer tokenizer/ --output data/ --target-tokens 5000000 --filter default
    # inspect a token file
    python data_utils.py stats data/train.bin
    # throughput / memory benchmark (end to end vs bare encode_batch): it lives in benchmark.py;
    # `python data_utils.py bench ...` still works and forwards its flags to this command
    python benchmark.py data --input books/ --tokenizer tokenizer/

Library use (see docs/API.md):

    from data_utils import load_tokenizer, read_token_file, TokenWindowSampler
    tok = load_tokenizer("tokenizer/")
    tokens = read_token_file("data/train.bin")
    sampler = TokenWindowSampler(tokens, seq_len=256, batch_size=8, seed=0)
    x, y = sampler.next_batch()
"""
from __future__ import annotations

import argparse
import codecs
import glob as _glob
import gzip
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
import re
import struct
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

import common
from common import (FishAIError, atomic_dir, atomic_output, atomic_write_text, write_json, run_cli, ArgumentParser,
                    add_overwrite_flag,
                    add_quiet_flag, float_flag, int_flag, one_line, size_flag, EXIT_OK)


class DataError(FishAIError):
    """Every bad-input error of the data pipeline: one line naming the file/flag and the fix."""


# ----------------------------------------------------------------------------------------------
# special tokens: ids 0..3 are fixed so every tokenizer trained here agrees on them

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_ID, IM_START_ID, IM_END_ID, PAD_ID = 0, 1, 2, 3

# ChatML, the same template Qwen/OpenAI-style chat models use. No default system prompt: the
# rendered text is exactly the messages, so SFT data and inference prompts agree byte for byte.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# One whitespace-separated word per this many characters or more means text with spaces between
# its words; a script without them (Chinese, Japanese) has whole lines as one "word", so word-level
# figures mean nothing there and character-level ones are used. Measured on ../shared/data: English
# books and WikiText have one word per 5-6 characters, the Python docs one per 7, the Chinese books
# one per 20-42 (their first 20 KB, English Gutenberg header included).
SPACED_CHARS_PER_WORD = 12


def is_spaced(n_chars: int, n_words: int) -> bool:
    """Whether text with these counts has spaces between its words (word perplexity, tokens per
    word make sense) or not (report per-character figures instead)."""
    return n_words > 0 and n_words * SPACED_CHARS_PER_WORD >= n_chars


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
# tokenizer


def _tokenizer_config(chat_template: str = CHATML_TEMPLATE, model_max_length: int = 1 << 20) -> dict:
    """tokenizer_config.json contents that transformers.AutoTokenizer understands offline."""
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "additional_special_tokens": [SPECIAL_TOKENS[IM_START_ID], SPECIAL_TOKENS[IM_END_ID]],
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
    }


def _special_tokens_map() -> dict:
    return {
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "additional_special_tokens": [SPECIAL_TOKENS[IM_START_ID], SPECIAL_TOKENS[IM_END_ID]],
    }


def fast_encode_batch(backend, texts: list[str]):
    """backend.encode_batch without the character offsets nobody here reads (tokenizers >= 0.20:
    encode_batch_fast, ~25% faster on 2 cores); the same ids either way."""
    fn = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return fn(texts, add_special_tokens=False)


class TextTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` plus its tokenizer_config.json.

    encode() treats special-token strings typed in the text as plain text (so a user cannot
    inject `<|im_end|>` into a chat); pass allow_special=True to parse them as control tokens.
    """

    def __init__(self, tokenizer_json: str, tokenizer_config: dict | str | None = None):
        from tokenizers import Tokenizer

        if isinstance(tokenizer_config, str):
            tokenizer_config = json.loads(tokenizer_config)
        self.config: dict = dict(tokenizer_config or _tokenizer_config())
        self._json = tokenizer_json
        # two instances instead of flipping one flag per call: encode_batch runs on many
        # Rust threads and callers may use both modes concurrently
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.encode_special_tokens = True
        self._tok_special = Tokenizer.from_str(tokenizer_json)
        self._tok_special.encode_special_tokens = False
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = vocab.get(SPECIAL_TOKENS[EOS_ID])
        self.im_start_id = vocab.get(SPECIAL_TOKENS[IM_START_ID])
        self.im_end_id = vocab.get(SPECIAL_TOKENS[IM_END_ID])
        self.pad_id = vocab.get(SPECIAL_TOKENS[PAD_ID])
        self.chat_template: str | None = self.config.get("chat_template")
        canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        self.hash: str = hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # -- construction / persistence
    @classmethod
    def from_dir(cls, path) -> "TextTokenizer":
        path = Path(path)
        tj = path / "tokenizer.json" if path.is_dir() else path
        if not tj.is_file():
            raise DataError(f"{path}: {'no tokenizer.json found' if path.exists() else 'tokenizer not found'}; "
                            f"train one with `python tokenizer_train.py --data ... --output-dir {path}`")
        try:
            text = tj.read_text(encoding="utf-8")
            json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{tj}: not a readable tokenizer.json ({e}); re-train the tokenizer") from None
        cfg_path = tj.parent / "tokenizer_config.json"
        cfg = None
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{cfg_path}: invalid JSON ({e}); delete it or re-train the tokenizer") from None
        try:
            return cls(text, cfg)
        except DataError:
            raise
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{tj}: cannot load tokenizer ({e}); re-train the tokenizer") from None

    @classmethod
    def from_dict(cls, d: dict) -> "TextTokenizer":
        if not isinstance(d, dict) or "tokenizer_json" not in d:
            raise DataError("tokenizer dict must have a 'tokenizer_json' entry (from TextTokenizer.to_dict())")
        return cls(d["tokenizer_json"], d.get("tokenizer_config"))

    def to_dict(self) -> dict:
        return {"tokenizer_json": self._json, "tokenizer_config": json.dumps(self.config, ensure_ascii=False)}

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self._json)
        atomic_write_text(out / "tokenizer_config.json", json.dumps(self.config, indent=2, ensure_ascii=False))
        atomic_write_text(out / "special_tokens_map.json", json.dumps(_special_tokens_map(), indent=2))
        return out

    @property
    def backend(self):
        """The underlying tokenizers.Tokenizer (special strings in text are NOT parsed)."""
        return self._tok

    # -- encode / decode
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        tok = self._tok_special if allow_special else self._tok
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        tok = self._tok_special if allow_special else self._tok
        return [e.ids for e in fast_encode_batch(tok, list(texts))]

    def decode(self, ids, skip_special: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"

    # -- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        template = self.chat_template or CHATML_TEMPLATE
        _check_messages(messages)
        if template == CHATML_TEMPLATE:
            return render_chatml(messages, add_generation_prompt)
        import jinja2.sandbox  # lazy: only custom templates need it

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                eos_token=SPECIAL_TOKENS[EOS_ID])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """ChatML ids and the assistant mask (1 on assistant content tokens and their <|im_end|>).

        Each message is encoded in pieces (header, content, footer) so message text can never
        produce control tokens; for ordinary text the ids equal
        encode(apply_chat_template(messages), allow_special=True).
        """
        _check_messages(messages)
        if self.im_start_id is None or self.im_end_id is None:
            raise DataError("tokenizer has no <|im_start|>/<|im_end|> tokens; re-train it with tokenizer_train.py")
        ids: list[int] = []
        mask: list[int] = []
        nl = self.encode("\n")
        for m in messages:
            head = [self.im_start_id] + self.encode(m["role"] + "\n")
            body = self.encode(m["content"]) + [self.im_end_id]
            a = 1 if m["role"] == "assistant" else 0
            ids += head + body + nl
            mask += [0] * len(head) + [a] * len(body) + [0] * len(nl)
        if add_generation_prompt:
            head = [self.im_start_id] + self.encode("assistant\n")
            ids += head
            mask += [0] * len(head)
        return ids, mask


def chat_stop_ids(tokenizer) -> list[int]:
    """<|im_end|> ends an assistant turn; <|endoftext|> also stops a model that never learned it."""
    ids = [getattr(tokenizer, "im_end_id", None), getattr(tokenizer, "eos_id", None)]
    return [i for i in ids if i is not None]


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that are safe to print.

    Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character (Chinese,
    emoji...), and decoding such a prefix yields U+FFFD. We therefore only emit text once the
    pending tokens decode without a trailing U+FFFD. To stay O(n) we decode a small window
    (the approach of vLLM/TGI): `prefix` marks the start of the window, which always lies on a
    character boundary, and `read` the end of the text that was already emitted.
    """

    def __init__(self, tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly printable text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Return whatever is still pending (possibly ending in U+FFFD if the model produced
        invalid UTF-8), so that all pieces together equal decode(all ids)."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """CHATML_TEMPLATE rendered in plain Python: fast in data loaders, no jinja needed."""
    out = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class ChatDocument(str):
    """A conversation read from a chat jsonl row (`messages`, `conversations` or instruction/
    output), as its ChatML text (what tokenizer_train trains on); .messages keeps the turns, so
    prepare encodes it with TextTokenizer.encode_chat: control tokens only where the template
    puts them, never from the message text."""

    messages: list

    def __new__(cls, messages: list[dict]):
        doc = super().__new__(cls, render_chatml(messages))
        doc.messages = messages
        return doc


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise DataError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be a dict with string 'role' and 'content' (got {str(m)[:80]})")


def load_tokenizer(path) -> TextTokenizer:
    """Load a tokenizer directory (tokenizer.json + tokenizer_config.json), a tokenizer.json file, or
    the tokenizer a FishAI checkpoint (.pt) embeds. Any other model file is refused with what it is."""
    p = Path(path)
    if p.is_file() and p.name != "tokenizer.json":
        kind = common.file_kind(p)
        if kind in ("zip", "checkpoint"):
            return _checkpoint_tokenizer(p)
        if kind not in TEXT_KINDS:
            raise DataError(f"{p} is {common.FILE_KINDS[kind][0]}, not a tokenizer: pass the tokenizer directory "
                            "(tokenizer_train.py's --output-dir, or a prepared dataset's tokenizer/)")
    return TextTokenizer.from_dir(path)


def _checkpoint_tokenizer(path: Path) -> TextTokenizer:
    """The tokenizer embedded in a FishAI .pt checkpoint (train.py saves it there)."""
    import torch  # lazy: only a checkpoint needs it
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or unsafe: one line
        raise DataError(f"{path}: a zip file that is not a readable FishAI checkpoint ({one_line(e)}); "
                        "pass the tokenizer directory") from None
    data = ckpt.get("tokenizer") if isinstance(ckpt, dict) else None
    if not data:
        raise DataError(f"{path}: the checkpoint embeds no tokenizer; pass the tokenizer directory it was "
                        "trained with (tokenizer_train.py's --output-dir)")
    return TextTokenizer.from_dict(data)


MAX_UNDECODABLE = 0.01  # a "text" file with more undecodable bytes than this share is refused
TEXT_KINDS = (None, "text", "json")  # common.file_kind's answers for what may be read as text


def check_not_binary(path: Path, kind: str | None = "?") -> None:
    """Refuse one of the project's own files (or another known binary) passed as text, saying what
    it is and what takes it (kind: common.file_kind's answer; read here when not given)."""
    kind = common.file_kind(path) if kind == "?" else kind
    if kind not in TEXT_KINDS:
        what, takes = common.FILE_KINDS[kind]
        raise DataError(f"{path} is {what}, not text: " + takes.format(path=str(path), parent=str(path.parent) + os.sep))


def check_text_file(path: Path, probe: int = 1 << 20) -> None:
    """Refuse a file that is not text before a single document of it is read: one of the project's
    own formats (with what to pass instead) or anything mostly undecodable as UTF-8."""
    with open(path, "rb") as f:
        raw = f.read(probe)
    check_not_binary(path)
    if not raw:
        return
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if len(raw) == probe:  # a character cut at the end of the probe is not an error
        bad = max(0, bad - 1)
    share = bad / max(1, len(text))
    if share > MAX_UNDECODABLE:
        raise DataError(f"{path}: {share:.1%} of its first {len(raw):,} bytes are not UTF-8 text (more than "
                        f"{MAX_UNDECODABLE:.0%}): pass UTF-8 text (.txt/.md/.jsonl/.parquet); text in another "
                        f"encoding converts with: iconv -f LATIN1 -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}")


# ----------------------------------------------------------------------------------------------
# readers

_BAD_UTF8 = [0]


def _count_replace(err: UnicodeDecodeError):
    # counts undecodable bytes instead of crashing; the caller reports the total
    _BAD_UTF8[0] += err.end - err.start
    return ("\ufffd", err.end)


codecs.register_error("fishai-count", _count_replace)

TEXT_EXTS = (".txt", ".text", ".md", ".tokens", ".raw")
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTS = (".parquet",)
SUPPORTED_EXTS = TEXT_EXTS + JSONL_EXTS + PARQUET_EXTS


def _bump(stats: dict | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def _open_text(path: Path):
    try:
        return open(path, "r", encoding="utf-8", errors="fishai-count")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None


ONE_BLOCK_LINES = 100  # a .txt of this many lines and no blank one is likely one sentence per line


def one_block_note(stats: dict) -> str | None:
    """The note for text files read as one document (no blank line in many lines), or None."""
    files = stats.get("one_block_files") or []
    if not files:
        return None
    return (f"{files[0]}{f' and {len(files) - 1} more' if len(files) > 1 else ''}: no blank line in "
            f"{ONE_BLOCK_LINES}+ lines, so read as ONE document; if it holds one sentence or document per line, "
            "pass --txt-mode line")


def _iter_txt(path: Path, mode: str, stats: dict | None) -> Iterator[str]:
    """txt: one document per blank-line-separated block ("block", default), per line ("line")
    or the whole file ("file")."""
    check_text_file(path)
    before = _BAD_UTF8[0]
    n = lines = 0
    with _open_text(path) as f:
        if mode == "file":
            text = f.read()
            if text.strip():
                n += 1
                yield text
        elif mode == "line":
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    n += 1
                    yield line
        else:
            block: list[str] = []
            for line in f:
                lines += 1
                if line.strip():
                    block.append(line)
                elif block:
                    n += 1
                    yield "".join(block).rstrip("\n")
                    block = []
            if block:
                n += 1
                yield "".join(block).rstrip("\n")
    _bump(stats, "bad_utf8_bytes", _BAD_UTF8[0] - before)
    if n == 0:
        _bump(stats, "empty_files")
    elif n == 1 and mode == "block" and stats is not None and lines >= ONE_BLOCK_LINES:
        stats.setdefault("one_block_files", []).append(str(path))


def iter_jsonl(path, skip_bad_lines: bool = False, stats: dict | None = None,
               fix: str = "fix the line or pass --skip-bad-lines") -> Iterator[tuple[int, object]]:
    """(line number, parsed row) for every non-empty line of a .jsonl (or .jsonl.gz) file: THE jsonl
    reader (documents, SFT conversations, evaluate.py's benchmark files). A line that is not JSON
    is a DataError naming file:line and `fix`, or skipped and counted in stats["bad_lines"]."""
    path = Path(path)
    before = _BAD_UTF8[0]
    try:
        f = gzip.open(path, "rt", encoding="utf-8", errors="fishai-count") if path.suffix == ".gz" else _open_text(path)
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    if not skip_bad_lines:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); {fix}") from None
                    _bump(stats, "bad_lines")
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read it as gzipped JSON lines ({type(e).__name__})") from None
    finally:
        _bump(stats, "bad_utf8_bytes", _BAD_UTF8[0] - before)


def _iter_jsonl(path: Path, text_key: str, skip_bad_lines: bool, stats: dict | None) -> Iterator[str]:
    n = 0
    for lineno, row in iter_jsonl(path, skip_bad_lines, stats):
        text = row.get(text_key) if isinstance(row, dict) else None
        if text is None and _is_chat_row(row):
            try:
                text = ChatDocument(normalize_conversation(row))
            except DataError as e:
                if not skip_bad_lines:
                    raise DataError(f"{path}:{lineno}: {e}; fix the line or pass --skip-bad-lines") from None
                _bump(stats, "bad_lines")
                continue
        if not isinstance(text, str):
            if skip_bad_lines:
                _bump(stats, "bad_lines")
                continue
            what = "is not a JSON object" if not isinstance(row, dict) else (
                f"has no string field '{text_key}' (keys: {', '.join(list(row)[:8])})")
            raise DataError(f"{path}:{lineno}: line {what}; pass --text-key KEY or --skip-bad-lines")
        if text.strip():
            n += 1
            yield text
    if n == 0:
        _bump(stats, "empty_files")


def _is_chat_row(row) -> bool:
    return isinstance(row, list) or isinstance(row, dict) and (
        "messages" in row or "conversations" in row or ("instruction" in row and "output" in row))


def _iter_parquet(path: Path, text_key: str, stats: dict | None) -> Iterator[str]:
    import pyarrow.parquet as pq  # lazy: only parquet inputs need it

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    cols = pf.schema_arrow.names
    if text_key not in cols:
        raise DataError(f"{path}: parquet file has no column '{text_key}' (columns: {', '.join(cols[:12])}); "
                        f"pass --text-key COLUMN")
    n = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                n += 1
                yield text
    if n == 0:
        _bump(stats, "empty_files")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub be reached? A cheap check before a download: offline, `datasets`
    and `transformers` otherwise retry for ~30-50 s before they fail."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_hf_dataset(name: str, config: str | None = None, split: str = "train", streaming: bool = False):
    """datasets.load_dataset (lazy import), offline-aware: when the hub cannot be reached only the
    local datasets cache is tried, and every failure becomes one DataError line."""
    offline = not hub_reachable()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read when datasets / huggingface_hub are imported
        for mod_name in ("huggingface_hub.constants", "datasets.config"):
            mod = sys.modules.get(mod_name)
            if mod is not None and hasattr(mod, "HF_HUB_OFFLINE"):
                mod.HF_HUB_OFFLINE = True  # imported earlier in this process: flip the flag they read
    try:
        import datasets  # lazy: optional and slow to import
    except ImportError:
        raise DataError(f"HF dataset {name}: the 'datasets' package is not installed (pip install datasets), "
                        f"or pass local files instead") from None
    what = name + (f":{config}" if config else "") + f" split '{split}'"
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown name, missing split: all end here
        if offline:
            reason = "not in the local datasets cache and the Hugging Face hub is unreachable (offline)"
        else:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            reason = f"{type(e).__name__}: {first}"
        raise DataError(f"could not load HF dataset {what}: {reason}; download it on a connected machine "
                        f"or pass local files instead") from None


def _iter_hf(spec: str, text_key: str, stats: dict | None) -> Iterator[str]:
    # "hf:NAME[:CONFIG][:SPLIT]"
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    ds = load_hf_dataset(name, config, split=split, streaming=True)
    try:
        it = iter(ds)
        first = next(it, None)
    except Exception as e:
        raise DataError(f"{spec}: could not read Hugging Face dataset '{name}' ({type(e).__name__}); "
                        f"download it elsewhere and pass local files instead") from None
    if first is None:
        _bump(stats, "empty_files")
        return
    if text_key not in first:
        raise DataError(f"{spec}: dataset has no field '{text_key}' (fields: {', '.join(first)}); pass --text-key")
    for row in itertools.chain([first], it):
        t = row.get(text_key)
        if isinstance(t, str) and t.strip():
            yield t


def _expand_files(source: str) -> list[Path]:
    p = Path(source)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SUPPORTED_EXTS
                       and not q.name.startswith("."))
        if not files:
            raise DataError(f"{p}: directory has no {'/'.join(SUPPORTED_EXTS)} files")
        return files
    if p.is_file():
        return [p]
    if any(c in source for c in "*?["):
        files = sorted(Path(f) for f in _glob.glob(source, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{source}: glob matched no files")
        return files
    raise DataError(f"{source}: no such file or directory (inputs: txt, jsonl, parquet, dir, glob, "
                    f"hf:NAME[:CONFIG][:SPLIT] or python-docs)")


TXT_MODES = ("block", "line", "file")


def add_text_format_flags(p, data_flag: str = "--data") -> None:
    """--text-key and --txt-mode, the same two flags wherever raw text is read."""
    p.add_argument("--text-key", default="text", help="jsonl field / parquet column / HF field with the text")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="block",
                   help=f"how .txt {data_flag} splits into documents: blank-line blocks, one per line (a "
                        "one-sentence-per-line corpus), or one per file")


def iter_documents(source, text_key: str = "text", skip_bad_lines: bool = False, stats: dict | None = None,
                   txt_mode: str = "block") -> Iterator[str]:
    """Yield documents (str) from a source, streaming.

    source: a .txt/.md file (documents = blank-line-separated blocks; txt_mode="line" for one per
    line, "file" for the whole file), .jsonl (field `text_key`), .parquet (column `text_key`),
    a directory (recursively, sorted), a glob, "hf:NAME[:CONFIG][:SPLIT]" or "python-docs".
    A list/tuple of sources is read in order. stats (dict) receives counts: files, bad_lines,
    bad_utf8_bytes (undecodable bytes replaced by U+FFFD), empty_files.
    """
    if isinstance(source, (list, tuple)):
        for s in source:
            yield from iter_documents(s, text_key, skip_bad_lines, stats, txt_mode)
        return
    source = str(source)
    if source == "python-docs":
        yield from iter_python_docs()
        return
    if source.startswith("hf:"):
        yield from _iter_hf(source, text_key, stats)
        return
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode must be block, line or file (got {txt_mode!r})")
    for path in _expand_files(source):
        _bump(stats, "files")
        suf = path.suffix.lower()
        if suf in JSONL_EXTS:
            yield from _iter_jsonl(path, text_key, skip_bad_lines, stats)
        elif suf in PARQUET_EXTS:
            yield from _iter_parquet(path, text_key, stats)
        else:
            yield from _iter_txt(path, txt_mode, stats)


# "python-docs": documentation that ships with every Python, so a first training run needs no
# download. Only pure-library modules without side effects on import (no GUI, no `this`).
_PYDOC_MODULES = """abc argparse ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd
code codecs codeop collections colorsys compileall concurrent configparser contextlib contextvars copy
copyreg csv ctypes dataclasses datetime dbm decimal difflib dis doctest email enum errno filecmp
fileinput fnmatch fractions ftplib functools gc getopt getpass gettext glob graphlib gzip hashlib heapq
hmac html http imaplib importlib inspect io ipaddress itertools json keyword linecache locale logging
lzma mailbox marshal math mimetypes modulefinder multiprocessing netrc numbers opcode operator optparse
os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats
py_compile pyclbr pydoc queue quopri random re reprlib rlcompleter sched secrets select selectors
shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string stringprep
struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit
token tokenize tomllib trace traceback tracemalloc types typing unicodedata unittest urllib uuid
warnings wave weakref wsgiref xml xmlrpc zipapp zipfile zipimport zlib zoneinfo""".split()


def _python_doc_modules() -> list[str]:
    import pkgutil

    names = []
    for top in _PYDOC_MODULES:
        try:
            mod = importlib.import_module(top)
        except Exception:
            continue  # absent on this build (e.g. no _ssl): skip, the order of the rest is unchanged
        names.append(top)
        if hasattr(mod, "__path__"):
            subs = sorted(i.name for i in pkgutil.walk_packages(mod.__path__, top + ".", onerror=lambda n: None))
            names += [s for s in subs if ".test" not in s and "__main__" not in s and "win" not in s.split(".")[-1]]
    return names


def iter_python_docs() -> Iterator[str]:
    """English documentation bundled with Python: pydoc topics, then one document per stdlib
    module made of its docstrings (module, classes, functions, methods), de-duplicated, in a
    deterministic order (depends only on the Python version)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    for key in sorted(topics):
        text = topics[key].strip()
        if text and text not in seen:
            seen.add(text)
            yield text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _python_doc_modules():
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
            parts: list[str] = []

            def add(title: str, doc) -> None:
                if not isinstance(doc, str):
                    return
                doc = inspect.cleandoc(doc)
                if len(doc) < 40 or doc in seen:
                    return
                seen.add(doc)
                parts.append(f"{title}\n\n{doc}")

            add(f"Module {name}", mod.__doc__)
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_"):
                    continue
                # only what the module itself defines: re-exported names depend on which other
                # modules happen to be imported, and would make the corpus differ between runs
                if getattr(obj, "__module__", None) != name:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    add(f"{name}.{attr}{_signature(obj)}", obj.__doc__)
                    if inspect.isclass(obj):
                        for k, v in sorted(vars(obj).items()):
                            if k.startswith("_") and k != "__init__":
                                continue
                            if callable(v) or isinstance(v, (property, classmethod, staticmethod)):
                                add(f"{name}.{attr}.{k}{_signature(v)}", getattr(v, "__doc__", None))
            if parts:
                yield "\n\n".join(parts)


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    # parameter names only: default values can be runtime objects (<object at 0x7f...>, a list of
    # live logging handlers) that differ between runs, and the corpus must be the same every time
    empty = inspect.Parameter.empty
    params = [p.replace(default=empty, annotation=empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=empty))


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


# ----------------------------------------------------------------------------------------------
# SFT chat data

IGNORE_INDEX = -1  # == model.IGNORE_INDEX: targets with this value are ignored by the loss

_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
             "chatgpt": "assistant", "model": "assistant", "system": "system"}


def normalize_conversation(row) -> list[dict]:
    """Convert one SFT row to a ChatML messages list. Accepts {"messages": [...]},
    BelleGroup/ShareGPT {"conversations": [{"from", "value"}]}, Alpaca {"instruction", "input",
    "output"} (optional "system") or a bare messages list. Raises DataError on anything else."""
    if isinstance(row, list):
        msgs = row
    elif isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
    elif isinstance(row, dict) and "conversations" in row:
        msgs = []
        if not isinstance(row["conversations"], list):
            raise DataError("'conversations' must be a list")
        for turn in row["conversations"]:
            if not isinstance(turn, dict):
                raise DataError("each conversation turn must be an object")
            frm = str(turn.get("from", turn.get("role", ""))).lower()
            if frm not in _ROLE_MAP:
                raise DataError(f"unknown speaker '{frm}' (expected human/gpt/user/assistant/system)")
            msgs.append({"role": _ROLE_MAP[frm], "content": turn.get("value", turn.get("content"))})
    elif isinstance(row, dict) and "instruction" in row and "output" in row:
        user = str(row["instruction"])
        if row.get("input"):
            user += "\n\n" + str(row["input"])
        msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    else:
        keys = ", ".join(list(row)[:8]) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"row has no 'messages', 'conversations' or 'instruction'/'output' (got {keys})")
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise DataError("each message must be an object with 'role' and 'content'")
        role = _ROLE_MAP.get(str(m.get("role", "")).lower())
        if role is None:
            raise DataError(f"unknown role '{m.get('role')}' (expected system/user/assistant)")
        if not isinstance(m.get("content"), str):
            raise DataError(f"message content must be a string (role {role})")
        out.append({"role": role, "content": m["content"]})
    return out


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

META_FORMAT = "fishai-data"
META_VERSION = 1


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark moved to benchmark.py; the old command still works
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("benchmark.py")), "data", *argv[1:]])
    args = build_parser().parse_args(argv)
    return run_cli(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
