"""
The conventions every FishAI script shares, and nothing else: errors and exit codes (`run_cli`),
the argparse helpers and flag types, atomic file and directory writes (and the rules that keep a
user's files safe), device and dtype resolution, and the one --json / markdown writer.

Torch-free at import (torch is imported inside the device functions): the ground every other
module stands on, and nothing heavy to load for it.

    import common
    p = common.ArgumentParser(description="...")
    p.add_argument("--steps", type=common.int_flag(1), default=10)
    common.add_device_flag(p)
    args = p.parse_args()
    sys.exit(common.run_cli(work, args))      # FishAIError -> "error: ..." and exit 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# errors and exit codes


class FishAIError(ValueError):
    """A bad input (file, flag, value): the message is one line that names it and says what to do.
    Every script's own error type derives from it; run_cli prints it and exits with EXIT_USAGE."""


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# EXIT_FAILED: the job ran but did not succeed (a failed check, a diverged run, nothing scored);
# EXIT_USAGE: bad input (a flag, a missing or malformed file), as argparse does for bad flags.


class RunFailed(FishAIError):
    """The job started but could not finish (out of memory, a diverged run, a failed check):
    run_cli prints it as one line and exits with EXIT_FAILED."""


class DataError(FishAIError):
    """Every bad-input error of the data pipeline: one line naming the file/flag and the fix."""


IGNORE_INDEX = -1  # a target with this value is ignored by the loss (padding, non-assistant tokens)


class CheckpointError(FishAIError):
    """A model file that cannot be used (.pt, .bin or HF directory); the message names the file
    and what to do. model.py raises it."""


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_cli(fn, *args) -> int:
    """Run a command's work with the one exit-code convention: it returns an exit code, None
    (EXIT_OK) or a summary dict (EXIT_INTERRUPTED when its "interrupted" is "SIGINT": a run that
    Ctrl-C stopped after saving); RunFailed -> `error: ...` and EXIT_FAILED; FishAIError (and a
    missing or unreadable file) -> `error: ...` on one line and EXIT_USAGE; Ctrl-C ->
    EXIT_INTERRUPTED; a closed stdout pipe (`| head`) -> EXIT_OK."""
    try:
        rc = fn(*args)
        if isinstance(rc, dict):
            return EXIT_INTERRUPTED if rc.get("interrupted") == "SIGINT" else EXIT_OK
        return EXIT_OK if rc is None else int(rc)
    except RunFailed as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except (FishAIError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was left", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # the reader went away: no second error at exit
        except OSError:
            pass
        return EXIT_OK


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends '(default: X)' once, only where the help
    text does not already say its default and the default is a real value."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or text == argparse.SUPPRESS or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text  # an on/off flag's default is its absence
        return f"{text} (default: {action.default})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' conventions: the usage-error message is one line
    (`error: argument --x: ...`) and the exit code is EXIT_USAGE; help shows defaults once."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _ranged(cast, name: str, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: cast the text and check lo <= value <= hi (or < with *_open)."""
    def check(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo} (got {text})")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi} (got {text})")
        return v
    check.__name__ = name.replace(" ", "_")  # argparse names the type in some messages
    return check


def int_flag(lo=None, hi=None):
    """argparse type for an integer in [lo, hi], e.g. type=int_flag(1) for a count."""
    return _ranged(int, "an integer", lo, hi)


def float_flag(lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type for a number in the given range, e.g. float_flag(0, lo_open=True) for > 0."""
    return _ranged(float, "a number", lo, hi, lo_open, hi_open)


_SIZE_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_size(text, flag: str = "size") -> int | None:
    """'500M' -> 500_000_000, '2B' -> 2_000_000_000, '1.5k', '5_000_000', '2e6' (K/M/B=G/T are
    powers of 1000). None stays None. The one size parser of the project."""
    if text is None:
        return None
    s = str(text).strip().upper().replace("_", "")
    mult = _SIZE_SUFFIX.get(s[-1:], 1)
    try:
        value = float(s[:-1] if s[-1:] in _SIZE_SUFFIX else s) * mult
    except ValueError:
        raise FishAIError(f"{flag}: cannot parse {text!r}; use e.g. 5000000, 500M or 2B") from None
    if not math.isfinite(value) or value < 0:
        raise FishAIError(f"{flag}: {text!r} must be a size >= 0 (e.g. 500M)")
    return int(value)


def size_flag(text):
    """argparse type for parse_size."""
    try:
        return parse_size(text)
    except FishAIError:
        raise argparse.ArgumentTypeError(f"cannot parse {text!r}; use e.g. 5000000, 500M or 2B") from None


DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "fp32": "fp32", "float16": "fp16", "half": "fp16",
                  "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16", "auto": "auto"}


def dtype_name(text) -> str:
    """Canonical dtype name (auto/fp32/fp16/bf16) of any accepted spelling (float32, bfloat16,
    torch.float16, ...); FishAIError otherwise."""
    key = str(text).strip().lower().replace("torch.", "")
    if key not in _DTYPE_ALIASES:
        raise FishAIError(f"--dtype {text}: unknown dtype; use one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPE_ALIASES[key]


def add_dtype_flag(p, help_text: str):
    def check(text):
        try:
            return dtype_name(text)
        except FishAIError:
            raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(DTYPE_CHOICES)}") from None
    p.add_argument("--dtype", type=check, default="auto", metavar="{" + ",".join(DTYPE_CHOICES) + "}", help=help_text)


def add_device_flag(p):
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps")


def add_dequantize_flag(p):
    p.add_argument("--dequantize", action="store_true", help="a quantized .bin runs with plain float weights "
                   "(dequantized at load) instead of its int8/int4 kernels")


def add_quiet_flag(p):
    """--quiet: no progress bars or per-item tables (results and errors still print); the older
    spelling --no-progress stays as a hidden alias."""
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-item tables")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_overwrite_flag(p, what: str = "existing output files"):
    """--overwrite: allow replacing what is already there (the older --force is a hidden alias)."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")
    p.add_argument("--force", dest="overwrite", action="store_true", help=argparse.SUPPRESS)


def check_writable_dir(path, flag: str = "--output-dir") -> bool:
    """Create `path` if needed and check that a file can be written there; FishAIError naming the
    flag otherwise. Returns True when this call created it, so that a run that fails before it has
    written anything can remove it again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FishAIError(f"{flag} {path}: exists and is not a directory; choose another directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FishAIError(f"{flag} {path} is not writable ({e.strerror or e}); choose another directory") from None
    return created


# ----------------------------------------------------------------------------------------------
# files: every output is written to a temp file (or dir) beside its target, then renamed into place,
# so a reader, a crash or Ctrl-C at any moment sees the old file or the new one, never half of one.


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path) -> None:
    try:  # make a rename itself durable
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temp path beside `path`; when the block ends without an error the temp file is
    fsynced and renamed to `path` (with the permissions the user's umask gives new files),
    otherwise it is removed. For writers that want a path (GGUFWriter); atomic_write wraps it for
    writers that want a file object. The one atomic file writer of the project."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; new files should follow the umask
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _silent_unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path, write_fn, mode: str = "wb") -> Path:
    """Create or replace `path` through write_fn(f) on a temp file beside it (atomic_output)."""
    with atomic_output(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write_fn(f)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    """atomic_write for a UTF-8 text file."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def _silent_unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _follow_umask(root: Path) -> None:
    """mkdtemp makes 0700 and some writers (safetensors) 0600: give the directory and every file
    in it the permissions the user's umask gives new ones."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _input_path(source) -> Path | None:
    """The local path a data source names (a glob: the folder its pattern starts in; NAME=PATH and
    NAME:PATH: the PATH); None for sources that are no local path (hf:NAME, python-docs)."""
    s = str(source)
    if s.startswith("hf:") or s == "python-docs":
        return None
    named = re.match(r"^[A-Za-z][\w.-]*[=:](.+)$", s)
    if named and not Path(s).exists():
        s = named.group(1)
    cut = min((s.index(c) for c in "*?[" if c in s), default=None)
    if cut is not None:
        s = os.path.dirname(s[:cut]) or "."
    return Path(s).expanduser().resolve()


def check_replaceable_dir(out, owns, overwrite: bool, flag: str = "--output", what: str = "this command's output") -> None:
    """An output directory this script replaces as a whole (atomic_dir) must be new, empty, or, with
    --overwrite, hold only what this script writes (`owns`: its top-level names, or a test of a
    name). Anything else is
    the user's and is never deleted: the directory is refused with a list of what is there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FishAIError(f"{flag} {out}: exists and is not a directory; choose another one")
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    mine = owns if callable(owns) else set(owns or ()).__contains__
    foreign = [n for n in present if not mine(n)]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise FishAIError(f"{flag} {out}: holds files that are not {what} ({shown}); they would be deleted, so "
                        "choose a new or empty directory")
    if not overwrite:
        raise FishAIError(f"{flag} {out}: already holds {what}; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False, flag: str = "--output", owns=(), what: str = "this command's output"):
    """Build a directory atomically: yield an empty temp dir beside `out`; when the block ends
    without an error, the temp dir takes the place of `out`. An existing non-empty `out` is only
    replaced with overwrite=True and when it holds nothing but the names in `owns` (what this
    writer makes: check_replaceable_dir), and is removed only after the new one is in place (a
    failure at any moment keeps the old one). On an error the temp dir is removed. The one atomic
    directory swap of the project (prepare, tokenizer_train, save_hf)."""
    out = Path(out)
    check_replaceable_dir(out, owns, overwrite, flag, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        yield tmp
        _follow_umask(tmp)
        if out.exists():
            check_replaceable_dir(out, owns, overwrite, flag, what)  # nothing foreign arrived meanwhile
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old"))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)


# ----------------------------------------------------------------------------------------------
# file kinds: what a file or folder is, from its bytes (a file) or its files (a folder). One table
# for the loaders' answers ("x.bin is a GGUF model: run it with llama.cpp ...") and the output rule.

QUANT_MAGIC = b"FISHAIQ\x00"   # first 8 bytes of a quantize.py .bin export
TOKENS_MAGIC = b"FISHTOK\x00"  # first 8 bytes of a prepared token file (train.bin / val.bin)

# kind -> (what it is, what takes it); {path} and {parent} are filled in. The first group is what
# the project writes (an output folder holding one holds another run's files).
FILE_KINDS = {
    "checkpoint": ("a PyTorch checkpoint (.pt, as train.py writes)",
                   "pass it as --model to generate.py, evaluate.py, benchmark.py, quantize.py or serve.py"),
    "quantized": ("a quantized model (quantize.py --format bin)",
                  "pass it as --model to generate.py, evaluate.py, benchmark.py or serve.py"),
    "gguf": ("a GGUF model (quantize.py --format gguf)", "run it with llama.cpp, or pass the .pt it came from"),
    "tokens": ("a prepared token file (data_utils.py prepare)",
               "pass its folder, {parent}, where a prepared dataset is expected (train.py --data {parent})"),
    "run": ("a training run folder (train.py / quick_train.py)",
            "pass its checkpoint as --model ({path}/fishai-best.pt), or continue it with train.py --resume auto"),
    "prepared": ("a prepared dataset folder (data_utils.py prepare)", "pass it as train.py --data"),
    "tokenizer": ("a tokenizer folder (tokenizer_train.py)", "pass it as --tokenizer"),
    "hf_model": ("an HF model folder", "pass it as --model"),
    "json": ("a JSON file", "a results file; not a model"),
    "png": ("a PNG image", "a plot; not a model"),
    # not the project's own
    "safetensors": ("a safetensors weights file", "pass its HF model folder as --model"),
    "zip": ("a zip archive that is not a PyTorch checkpoint", "unpack it first"),
    "parquet": ("a parquet file", "give it a .parquet extension so that it is read as parquet data"),
    "text": ("a text file", "pass it as --data / --input"),
    "folder": ("a folder without config.json (not an HF model folder)", "pass the file or folder the flag asks for"),
}
PROJECT_KINDS = ("checkpoint", "quantized", "gguf", "tokens", "run", "prepared", "tokenizer", "hf_model")
MODEL_KINDS = ("checkpoint", "quantized", "hf_model")  # what model.load_model reads
TEXT_KINDS = (None, "text", "json")  # file_kind's answers for a file that may be read as text
RUN_FILES = ("fishai-best.pt", "fishai-latest.pt", "fishai-stable.pt", "metrics.jsonl", "report.md",
             "report.json", "loss_curve.png")


def _head_kind(head: bytes) -> str | None:
    if head.startswith(QUANT_MAGIC):
        return "quantized"
    if head.startswith(TOKENS_MAGIC):
        return "tokens"
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x89PNG"):
        return "png"
    if len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return None


def _zip_kind(path: Path) -> str:
    import zipfile
    try:  # torch.save writes a zip whose archive folder holds data.pkl
        with zipfile.ZipFile(path) as z:
            return "checkpoint" if any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()) else "zip"
    except (zipfile.BadZipFile, OSError):
        return "checkpoint"  # a zip cut short is most likely a checkpoint cut short: load_checkpoint says so


def _folder_kind(path: Path) -> str:
    names = {p.name for p in path.iterdir()}
    if "config.json" in names:
        return "hf_model"
    if "train.bin" in names or "val.bin" in names:
        return "prepared"
    if "tokenizer.json" in names:
        return "tokenizer"
    if names & set(RUN_FILES) or any(n.startswith("round") and n[5:].isdigit() for n in names):
        return "run"
    return "folder"


def file_kind(path) -> str | None:
    """Which FILE_KINDS entry `path` is, from its first bytes or (a folder) the files in it; None for
    a missing path or a file of no known kind (binary, or undecodable as text)."""
    path = Path(path)
    try:
        if path.is_dir():
            return _folder_kind(path)
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    kind = _head_kind(head[:16])
    if kind:
        return kind
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not a character cut at the end of the probe
            return None
        text = head[:e.start].decode("utf-8")
    return "json" if text.lstrip()[:1] in ("{", "[") else "text"


def kind_of(path, kind: str) -> tuple[str, str]:
    """(what `path` is, what takes it) from FILE_KINDS, with its path and folder filled in."""
    path = Path(path)
    what, takes = FILE_KINDS[kind]
    return what, takes.format(path=str(path).rstrip(os.sep), parent=str(path.parent) + os.sep)


def describe(path, kind: str) -> str:
    """'<path> is <what>: <what takes it>' for a FILE_KINDS kind."""
    what, takes = kind_of(path, kind)
    return f"{path} is {what}: {takes}"


def check_model_path(path, flag: str | None = None) -> str:
    """The kind of a model input (one of MODEL_KINDS), or CheckpointError saying what the path is
    instead and what takes it: the one answer of every model loader."""
    p, named = Path(path), f"{flag} {path}" if flag else str(path)
    if not p.exists():
        raise CheckpointError(f"{named}: no such file or folder (train.py writes checkpoints/fishai-best.pt, "
                              "quick_train.py runs/quick/fishai-best.pt)")
    kind = file_kind(p)
    if kind in MODEL_KINDS:
        return kind
    if kind is None:
        raise CheckpointError(f"{named}: not a model (a binary file of no kind FishAI knows); pass a .pt "
                              "checkpoint, a quantize.py .bin or an HF model folder")
    raise CheckpointError(f"{(flag + ' ') if flag else ''}{describe(p, kind)}; a model is a .pt checkpoint, a "
                          "quantize.py .bin or an HF model folder")


# ----------------------------------------------------------------------------------------------
# the output rule: nothing a user made is ever replaced. Every command lists what it writes
# (Output) and what it reads, and check_plan refuses, before any work:
#   - an output that is, contains or lies inside an input (with or without --overwrite);
#   - an output folder holding another run's files (anything the project writes), without
#     --overwrite, naming what is there and the ways forward;
#   - an existing output file, without --overwrite;
#   - with --overwrite, anything that is not this command's own kind of file (a foreign file is never
#     replaced; a folder replaced as a whole may hold nothing else).


class Output:
    """One output of a command. kind: the FILE_KINDS kind it writes (a file) or "folder"; owns (a
    folder): {name: kind that name must be, or None} of what the command writes in it, or a test
    of a name (_own_kind); whole: the folder is replaced as a whole (atomic_dir); resume: how to continue the
    run found there, named in the refusal (train.py's "--resume auto"); continues: this command
    continues that run (train.py --resume with the run's fishai-latest.pt there), so its files are
    expected."""

    def __init__(self, path, flag: str, kind: str, owns=None, whole: bool = False, resume: str | None = None,
                 continues: bool = False):
        self.path, self.flag, self.kind, self.owns = path, flag, kind, owns
        self.whole, self.resume, self.continues = whole, resume, continues

    @property
    def folder(self) -> bool:
        return self.owns is not None


def _apart(out: Output, inputs) -> None:
    o = Path(out.path).expanduser().resolve()
    for flag, values in inputs:
        for src in values if isinstance(values, (list, tuple)) else [values]:
            p = _input_path(src) if src else None
            if p is None or not p.exists():  # a dataset name (wikitext, hf:...), not a local path
                continue
            how = "is" if o == p else "lies inside" if p in o.parents else "contains" if o in p.parents else None
            if how:
                raise FishAIError(f"{out.flag} {out.path}: {how} the input {flag} {src}; an output never replaces "
                                  f"an input, even with --overwrite: write it apart from the inputs")


def _own_kind(owns, name: str):
    """(is the name one this command writes, the kind it must be or None). owns: a dict, or a test
    of a name that answers False, True or the kind the name must be."""
    if callable(owns):
        mine = owns(name)
        return bool(mine), mine if isinstance(mine, str) else None
    return name in owns, owns.get(name)


def _listing(entries) -> str:
    return ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")


def _check_folder(out: Output, overwrite: bool) -> None:
    path = Path(out.path)
    if path.exists() and not path.is_dir():
        raise FishAIError(f"{out.flag} {path}: is a file ({FILE_KINDS.get(file_kind(path) or '', ('unknown',))[0]}); "
                          "give a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    mine, theirs, foreign, clash = [], [], [], []
    for p in sorted(path.iterdir()):
        own, want = _own_kind(out.owns, p.name)
        kind = file_kind(p)
        if own and (want is None or kind == want or out.continues):  # a run it continues is its own, even cut short
            mine.append(p.name)
        elif own:  # our name, but not our kind of file: the user's, never replaced
            what = FILE_KINDS[kind][0] if kind not in (None, "folder") else f"a {'folder' if p.is_dir() else 'file'} " \
                "it did not write"
            clash.append((p.name, f"{p.name} ({what})"))
        elif kind in PROJECT_KINDS or p.name in RUN_FILES:
            theirs.append(f"{p.name} ({FILE_KINDS[kind][0] if kind in PROJECT_KINDS else 'another run'})")
        else:
            foreign.append(p.name)
    if out.whole and (foreign or theirs or clash):
        names = sorted(foreign + [t.split(" (")[0] for t in theirs] + [n for n, _ in clash])
        raise FishAIError(f"{out.flag} {path}: holds files that this command did not write ({_listing(names)}); "
                          "it replaces the folder as a whole, which would delete them: choose a new or empty folder")
    if clash:
        raise FishAIError(f"{out.flag} {path}: holds {_listing([c for _, c in clash])} where this command writes its "
                          "own; a file it did not write is never replaced: choose another folder")
    present = mine + theirs
    if present and not overwrite and not out.continues:
        ways = ([f"pass {out.resume}"] if out.resume else []) + ["pass --overwrite to replace them",
                                                                  f"choose another {out.flag}"]
        raise FishAIError(f"{out.flag} {path}: already holds another run's files ({_listing(present)}); "
                          + ", or ".join(ways))


def _check_file(out: Output, overwrite: bool) -> None:
    path = Path(out.path)
    if path.is_dir():
        raise FishAIError(f"{out.flag} {path}: is a folder ({FILE_KINDS[file_kind(path)][0]}); give a file name")
    parent = next((q for q in path.resolve().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FishAIError(f"{out.flag} {path}: {parent} is a file, not a folder")
    if not path.exists():
        return
    if not overwrite:
        raise FishAIError(f"{out.flag} {path}: file exists; pass --overwrite to replace it, or another {out.flag}")
    kind = file_kind(path)
    if kind != out.kind and not (out.kind == "text" and kind == "json"):
        what = FILE_KINDS[kind][0] if kind else "a file of unknown kind"
        raise FishAIError(f"{out.flag} {path}: is {what}, not {FILE_KINDS[out.kind][0]}; --overwrite replaces only "
                          f"this command's own kind of file: choose another {out.flag}")


def check_plan(outputs, inputs=(), overwrite: bool = False) -> None:
    """The output rule (above), before any work: every command's first call is
    check_plan(*output_plan(args), args.overwrite). outputs: Output entries (a None path is skipped);
    inputs: (flag, path or list of paths) pairs (dataset names that are no local path are skipped)."""
    outputs = [o for o in outputs if o.path]
    seen: dict[Path, str] = {}
    for o in outputs:
        key = Path(o.path).expanduser().resolve()
        if key in seen:
            raise FishAIError(f"{o.flag} {o.path}: is also {seen[key]}; give each output its own path")
        seen[key] = o.flag
        _apart(o, inputs)
        _check_folder(o, overwrite) if o.folder else _check_file(o, overwrite)


def result_outputs(args) -> list:
    """The --json / --report outputs of a command (add_output_flags), for its output_plan."""
    return [Output(getattr(args, "json", None), "--json", "json"), Output(getattr(args, "report", None), "--report", "text")]


def add_eval_text_flags(p):
    """The evaluation-text flags: which local files scoring.load_eval_texts reads, one spelling for
    every command that scores perplexity."""
    p.add_argument("--wikitext103", metavar="PATH", help="local WikiText-103 file (e.g. wiki.test.tokens)")
    p.add_argument("--wikitext2", metavar="PATH", help="local WikiText-2 file (e.g. test.txt)")
    p.add_argument("--ptb", metavar="PATH", help="local PTB file (e.g. ptb.test.txt)")
    p.add_argument("--data", action="append", metavar="NAME=PATH", help="extra dataset (repeatable); NAME "
                   "wikitext103/wikitext2/ptb uses that reader, anything else reads plain text")
    p.add_argument("--split", default="test", help="split for hub datasets")
    p.add_argument("--limit", type=int_flag(1), default=None, help="score only the first N documents per dataset")
    p.add_argument("--max-chars", type=int_flag(1), default=None,
                   help="score at most N characters per dataset (quick runs; cut at a line boundary)")
    p.add_argument("--detokenize", action="store_true", help="undo WikiText tokenization (' @-@ ', ' , ') "
                   "before scoring, as the GPT-2 paper's zero-shot numbers did")
    p.add_argument("--stride", type=int_flag(1), default=None, help="new tokens per window (default: the "
                   "context length = disjoint windows; smaller = more context per token, slower)")
    p.add_argument("--max-seq-len", type=int_flag(1), default=None,
                   help="cap the context window (default: the model's)")
    p.add_argument("--batch-size", type=int_flag(1), default=8, help="windows per forward pass")
    return p


def eval_text_inputs(args) -> list:
    """The inputs add_eval_text_flags names, for an output_plan."""
    return [(f"--{k}", getattr(args, k, None)) for k in ("wikitext103", "wikitext2", "ptb", "data")]


# ----------------------------------------------------------------------------------------------
# device and dtype: the one resolver of each (torch is imported when they are called)


def resolve_device(name="auto", local_rank: int | None = None):
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N', 'mps'. A device this
    machine does not have is refused with a one-line FishAIError. CUDA devices always come back
    indexed (torch.cuda.set_device, DDP device_ids and the memory counters need the index: a bare
    "cuda" crashed train.py on its first GPU run). local_rank picks the GPU of a torchrun worker."""
    import torch
    name = str(name or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FishAIError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        return _cuda_device(name, dev, local_rank)
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FishAIError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise FishAIError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def _cuda_device(name: str, dev, local_rank: int | None):
    import torch
    if not torch.cuda.is_available():
        raise FishAIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if local_rank is not None:  # a torchrun worker uses the GPU of its local rank
        if local_rank >= count:
            raise FishAIError(f"LOCAL_RANK {local_rank}: this machine has {count} GPU(s); start at most "
                              f"{count} processes per node (torchrun --nproc_per_node {count})")
        return torch.device("cuda", local_rank)
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= count:
        raise FishAIError(f"--device {name}: this machine has {count} GPU(s) (cuda:0"
                          f"{f' .. cuda:{count - 1}' if count > 1 else ''}); pick one of them")
    return dev


def resolve_dtype(name, device="cpu"):
    """None -> None (keep the stored dtype); a torch.dtype as it is; 'auto' -> bf16 on a CUDA GPU
    that supports it (else fp16), fp32 elsewhere (CPU autocast is slower than fp32 for these
    sizes); 'fp32'/'fp16'/'bf16' and the long spellings (float32, bfloat16, ...)."""
    import torch
    if name is None or isinstance(name, torch.dtype):
        return name
    key = dtype_name(name)
    if key == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[key]


def autocast(device, dtype):
    """Mixed precision for a forward pass: torch.autocast in dtype, or nothing for fp32."""
    import torch
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# results: the one --json / --report writer of every script


def add_output_flags(p, json_help: str = "write the results as JSON", report: bool = True):
    """--json (and --report), --overwrite and --quiet: the output flags of the commands."""
    p.add_argument("--json", metavar="PATH", help=json_help)
    if report:
        p.add_argument("--report", metavar="PATH", help="write a markdown report")
    add_overwrite_flag(p, "existing --json/--report files" if report else "an existing --json file")
    add_quiet_flag(p)


def write_json(path, obj) -> None:
    """Results as JSON (indented, UTF-8, written atomically)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_outputs(args, res, to_markdown=None, say: bool = True) -> None:
    """Write --json (the results) and --report (to_markdown(results)) after a run; the paths were
    checked by check_plan before the run started."""
    if getattr(args, "json", None):
        write_json(args.json, res)
        if say:
            print(f"wrote {args.json}")
    if getattr(args, "report", None) and to_markdown is not None:
        atomic_write_text(args.report, to_markdown(res))
        if say:
            print(f"wrote {args.report}")
