"""
Readers: every source of raw text as an iterator of documents (txt/md blocks, lines or files,
jsonl, parquet, directories and globs, hf:NAME datasets, Python's bundled docs), the refusal of
files that are not text (by common.file_kind's table of the project's file kinds), and the
text statistics the metrics need (is_spaced).

    from readers import iter_documents
    for doc in iter_documents("books/"):
        ...
"""
from __future__ import annotations

import codecs
import glob as _glob
import gzip
import importlib
import inspect
import itertools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import common
from common import TEXT_KINDS, DataError
from text_tokenizer import ChatDocument

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


MAX_UNDECODABLE = 0.01  # a "text" file with more undecodable bytes than this share is refused


def check_not_binary(path: Path) -> None:
    """Refuse one of the project's own files (or another known binary) passed as text, saying what
    it is and what takes it (common.file_kind's table)."""
    kind = common.file_kind(path)
    if kind not in TEXT_KINDS:
        what, takes = common.kind_of(path, kind)
        raise DataError(f"{path} is {what}, not text: {takes}")


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
# chat rows: messages, ShareGPT conversations, instruction/input/output


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
