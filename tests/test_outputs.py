"""The output rule, enumerated (issue 26): nothing a user made is ever replaced.

Every script x every output it writes x the situations a user meets (the output is an input, lies
inside one, is a folder holding another run's files or a foreign file, is a file that exists: of
this command's own kind or not), with and without --overwrite. A refusal is one line naming the
output flag, a non-zero exit, and the user's folder hashed the same before and after; an allowed
run leaves every file it does not own byte-identical. Then every file kind the project writes or
reads x every model loader: one line saying what the file is and what takes it, non-zero exit.

A script added later fails test_every_script_states_its_outputs until it has an output_plan that
lists every output flag it has and a row in SPECS (or WRITES_NOTHING).
"""
import hashlib
import importlib
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from conftest import SHRINK  # noqa: E402

# the flags through which a script writes (argparse dests); every one must be in its output_plan
OUTPUT_DESTS = {"output", "output_dir", "json", "report", "png", "log_samples", "workdir"}
WRITES_NOTHING = {"generate", "serve"}

# (id, script, argv with {home} and {out}, the output flag, what it writes there: "file:<kind>" for a
# file of that FILE_KINDS kind, "inplace" for a folder it writes its own files into, "whole" for a
# folder it replaces as a whole; the input {out} may equal ("is") and an input folder it may lie in)
SPECS = [
    ("train", "train", "--config tiny " + " ".join(SHRINK) + " --data {home}/data --output-dir {out} "
     "--max-steps 2 --eval-interval 1 --eval-iters 1 --save-interval 1 --sample-interval 0 --quiet",
     "--output-dir", "inplace", "{home}/data", "{home}/data"),
    ("quick_train", "quick_train", "--config tiny --data {home}/books --output-dir {out} --quiet",
     "--output-dir", "whole", "{home}/books", "{home}/books"),
    ("quick_train-json", "quick_train", "--config tiny --data {home}/books --output-dir {home}/q --json {out}",
     "--json", "file:json", "{home}/books/book0.txt", "{home}/books"),
    ("tokenizer_train", "tokenizer_train", "--data {home}/books --output-dir {out} --vocab-size 300 --quiet",
     "--output-dir", "whole", "{home}/books", "{home}/books"),
    ("tokenizer_train-json", "tokenizer_train", "--data {home}/books --output-dir {home}/tok2 --vocab-size 300 "
     "--quiet --json {out}", "--json", "file:json", "{home}/books/book0.txt", "{home}/books"),
    ("quantize-bin", "quantize", "--model {home}/fishai-best.pt --output {out} --strategy int8 --quiet",
     "--output", "file:quantized", "{home}/fishai-best.pt", None),
    ("quantize-gguf", "quantize", "--model {home}/fishai-best.pt --output {out} --format gguf --strategy int8 "
     "--quiet", "--output", "file:gguf", "{home}/fishai-best.pt", None),
    ("quantize-hf", "quantize", "--model {home}/hf --output {out} --format hf --quiet",
     "--output", "whole", "{home}/hf", "{home}/hf"),
    ("quantize-json", "quantize", "--model {home}/fishai-best.pt --output {home}/q.bin --strategy int8 --quiet "
     "--json {out}", "--json", "file:json", "{home}/fishai-best.pt", None),
    ("prepare", "data_utils", "prepare --input {home}/books --tokenizer {home}/tokenizer --output {out} --quiet",
     "--output", "whole", "{home}/books", "{home}/books"),
    ("stats-json", "data_utils", "stats {home}/data/train.bin --json {out}",
     "--json", "file:json", "{home}/data/train.bin", None),
    ("evaluate-json", "evaluate", "--benchmark gsm8k --model {home}/fishai-best.pt --data-dir {home}/evaldata "
     "--limit 1 --json {out}", "--json", "file:json", "{home}/fishai-best.pt", "{home}/evaldata"),
    ("evaluate-log", "evaluate", "--benchmark gsm8k --model {home}/fishai-best.pt --data-dir {home}/evaldata "
     "--limit 1 --log-samples {out}", "--log-samples", "file:json", "{home}/fishai-best.pt", "{home}/evaldata"),
    ("benchmark-full-json", "benchmark", "full --model {home}/fishai-best.pt --wikitext2 {home}/books/book0.txt "
     "--no-generation --json {out}", "--json", "file:json", "{home}/fishai-best.pt", None),
    ("benchmark-full-report", "benchmark", "full --model {home}/fishai-best.pt --wikitext2 {home}/books/book0.txt "
     "--no-generation --report {out}", "--report", "file:text", "{home}/books/book0.txt", None),
    ("benchmark-self-test", "benchmark", "self-test --config tiny --json {out}", "--json", "file:json", None, None),
    ("benchmark-data-workdir", "benchmark", "data --input {home}/books --tokenizer {home}/tokenizer --workdir {out}",
     "--workdir", "inplace", "{home}/books", "{home}/books"),
    ("benchmark-recipe-png", "benchmark", "recipe --data {home}/books --png {out}", "--png", "file:png",
     "{home}/books/book0.txt", "{home}/books"),
    ("benchmark-gpu-json", "benchmark", "gpu --data {home}/books --json {out}", "--json", "file:json",
     "{home}/books/book0.txt", "{home}/books"),
    ("benchmark-serve-json", "benchmark", "serve --configs tiny --json {out}", "--json", "file:json", None, None),
    ("reference_benchmark", "reference_benchmark", "--models {home}/hf --wikitext2 {home}/books/book0.txt "
     "--json {out}", "--json", "file:json", "{home}/books/book0.txt", "{home}/hf"),
    ("reference_benchmark-report", "reference_benchmark", "--models {home}/hf --wikitext2 {home}/books/book0.txt "
     "--report {out}", "--report", "file:text", "{home}/books/book0.txt", "{home}/hf"),
    ("model-json", "model", "--json {out}", "--json", "file:json", None, None),
]
CASES = ("is-input", "inside-input", "run-folder", "foreign-folder", "own-file", "foreign-file")
# runs that are cheap enough to let through for real where the rule allows them (the others are
# checked up to their output_plan: the refusals above run every script's real main)
RUN_ALLOWED = {"train", "tokenizer_train-json", "quantize-bin", "quantize-json", "prepare", "stats-json",
               "model-json"}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def base_home(tmp_path_factory, tiny_ckpt, tiny_tokenizer_dir, training_texts):
    """A user's folder: books, a tokenizer, prepared data, a checkpoint and its HF export, an
    earlier run (runs/quick's files), a folder of their own notes, eval data, files of each kind."""
    import data_utils
    import quantize
    home = tmp_path_factory.mktemp("outputs_home")
    (home / "books").mkdir()
    for i in range(3):
        (home / "books" / f"book{i}.txt").write_text("\n\n".join(training_texts[i::3]), encoding="utf-8")
    shutil.copytree(tiny_tokenizer_dir, home / "tokenizer")
    shutil.copy(tiny_ckpt, home / "fishai-best.pt")
    assert data_utils.main(["prepare", "--input", str(home / "books"), "--tokenizer", str(home / "tokenizer"),
                            "--output", str(home / "data"), "--quiet"]) == 0
    assert quantize.main(["--model", str(tiny_ckpt), "--output", str(home / "hf"), "--format", "hf", "--quiet"]) == 0
    assert quantize.main(["--model", str(tiny_ckpt), "--output", str(home / "own.bin"), "--strategy", "int8",
                          "--quiet"]) == 0
    run = home / "run"  # what quick_train.py leaves in runs/quick
    run.mkdir()
    shutil.copy(tiny_ckpt, run / "fishai-best.pt")
    (run / "report.md").write_text("# quick_train report\n")
    (home / "notes").mkdir()
    (home / "notes" / "notes.txt").write_text("my notes\n")
    (home / "evaldata" / "gsm8k").mkdir(parents=True)
    (home / "evaldata" / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    (home / "own.json").write_text('{"earlier": "results"}\n')
    (home / "own.md").write_text("# earlier report\n")
    (home / "own.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    (home / "own.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\0" * 32)
    return home


@pytest.fixture
def home(base_home, tmp_path):
    h = tmp_path / "home"
    shutil.copytree(base_home, h, symlinks=True)
    return h


def own_file(kind: str) -> str:
    return {"json": "own.json", "text": "own.md", "quantized": "own.bin", "png": "own.png", "gguf": "own.gguf"}[kind]


def out_for(case: str, spec, home: Path) -> str | None:
    """The output path of a case (None: the case does not apply to this output)."""
    _, _, _, _, writes, is_input, inside = spec
    folder = not writes.startswith("file:")
    if case == "is-input":
        return is_input and is_input.format(home=home)
    if case == "inside-input":
        return inside and inside.format(home=home) + "/out" + ("" if folder else ".x")
    if case == "run-folder":
        return str(home / "run")
    if case == "foreign-folder":
        return str(home / "notes")
    if case == "own-file":
        return str(home / (own_file(writes[5:]) if not folder else "own.json"))
    return str(home / "fishai-best.pt") if not spec[0].startswith("quantize") or folder else str(home / "notes"
                                                                                                  / "notes.txt")


def expected(case: str, spec, overwrite: bool) -> bool:
    """Whether the rule lets this case through."""
    sid, writes = spec[0], spec[4]
    if case in ("is-input", "inside-input", "foreign-file"):
        return False
    if writes.startswith("file:"):
        return case == "own-file" and overwrite  # a folder is never a file's output
    if case == "own-file":  # a folder's output given as a file
        return False
    if writes == "inplace":
        return case == "foreign-folder" or overwrite  # a foreign file is left alone beside the run's own
    return sid == "quick_train" and case == "run-folder" and overwrite  # whole: only its own kind of folder


def run_main(script: str, argv: str, capsys) -> tuple[int, str]:
    module = importlib.import_module(script)
    try:
        rc = module.main(argv.split())
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def parse(script: str, argv: str):
    module = importlib.import_module(script)
    return module, module.build_parser().parse_args(argv.split())


MATRIX = [(spec, case, ow) for spec in SPECS for case in CASES for ow in (False, True)]


@pytest.mark.parametrize("spec,case,overwrite", MATRIX,
                         ids=[f"{s[0]}-{c}-{'overwrite' if o else 'plain'}" for s, c, o in MATRIX])
def test_the_output_rule(spec, case, overwrite, home, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(home)
    out = out_for(case, spec, home)
    if out is None:
        pytest.skip(f"{spec[0]} has no input for the case {case}")
    argv = spec[2].format(home=home, out=out) + (" --overwrite" if overwrite else "")
    before = snapshot(home)
    if not expected(case, spec, overwrite):
        rc, err = run_main(spec[1], argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == common.EXIT_USAGE and len(lines) == 1, err
        assert lines[0].startswith(f"error: {spec[3]} {out}"), lines[0]
        assert snapshot(home) == before  # nothing removed, changed or left behind
        return
    module, args = parse(spec[1], argv)
    common.check_plan(*module.output_plan(args), args.overwrite)  # the rule lets it through
    if spec[0] not in RUN_ALLOWED:
        return
    rc, err = run_main(spec[1], argv, capsys)
    assert rc == 0, err
    after = snapshot(home)
    own = {"train": set(__import__("train").RUN_FILES)}.get(spec[0], set())
    changed = {k for k in before if before[k] != after.get(k)}
    rel = str(Path(out).relative_to(home))
    # only the output itself (a file) or the run's own files in it (a folder) changed
    assert all(k == rel or (k.startswith(rel + "/") and Path(k).name in own) for k in changed), changed
    if case == "foreign-folder":
        assert after["notes/notes.txt"] == before["notes/notes.txt"]


def _output_flags(parser) -> dict:
    """{subcommand or '': ([(flag, dest)] of its output flags, the argv its required arguments need)}."""
    import argparse
    required = []
    for a in parser._actions:
        if a.required and not isinstance(a, argparse._SubParsersAction):
            required += ([a.option_strings[0]] if a.option_strings else []) + [a.choices[0] if a.choices else "x"]
    found = {"": ([(a.option_strings[0], a.dest) for a in parser._actions
                   if a.dest in OUTPUT_DESTS and a.option_strings and a.help != argparse.SUPPRESS], required)}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                found[name] = _output_flags(sub)[""]
    return found


def scripts() -> list[str]:
    return sorted(p.stem for p in ROOT.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_every_script_states_its_outputs(tmp_path):
    """Every script (found on disk) has an output_plan that lists each output flag it has, and a
    row in SPECS for each, or writes nothing at all."""
    covered = {(s[1], s[3]) for s in SPECS}
    for name in scripts():
        module = importlib.import_module(name)
        outputs = _output_flags(module.build_parser())
        if name in WRITES_NOTHING:
            assert not any(flags for flags, _ in outputs.values()), f"{name}.py writes {outputs}: give it SPECS rows"
            continue
        assert hasattr(module, "output_plan"), f"{name}.py has no output_plan(args): see common.check_plan"
        for sub, (flags, required) in outputs.items():
            for flag, dest in flags:
                argv = ([sub] if sub else []) + [a for a in required if a != flag] + [flag, str(tmp_path / f"o-{dest}.bin")]
                if dest in {a.lstrip("-").replace("-", "_") for a in required}:
                    argv = ([sub] if sub else []) + [a if a != "x" or prev != flag else str(tmp_path / f"o-{dest}.bin")
                                                     for prev, a in zip([None] + required, required)]
                args = module.build_parser().parse_args(argv)
                listed = [o.flag for o in module.output_plan(args)[0] if o.path]
                assert flag in listed, f"{name}.py {sub} {flag}: not in its output_plan ({listed})"
                assert (name, flag) in covered, f"{name}.py {flag}: no row in tests/test_outputs.py SPECS"


# ----------------------------------------------------------------------------------------------
# every file kind x every model loader: one line, what the file is, what takes it

def _kinds(home: Path) -> dict:
    """file -> what the one line must say."""
    (home / "x.gguf.bin").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\0" * 64)
    (home / "book.txt").write_text("plain text\n")
    return {
        "x.gguf.bin": "a GGUF model (quantize.py --format gguf): run it with llama.cpp, or pass the .pt it came from",
        "data/train.bin": "a prepared token file (data_utils.py prepare): pass its folder",
        "data": "a prepared dataset folder (data_utils.py prepare): pass it as train.py --data",
        "tokenizer": "a tokenizer folder (tokenizer_train.py): pass it as --tokenizer",
        "run": "a training run folder (train.py / quick_train.py): pass its checkpoint as --model",
        "book.txt": "a text file",
        "own.json": "a JSON file",
        "own.png": "a PNG image",
    }


LOADERS = [
    ("generate", "--model {f} --prompt hi --max-new-tokens 1", None),
    ("serve", "--model {f} --port {port}", None),
    ("evaluate", "--benchmark gsm8k --num-fewshot 0 --model {f} --data-dir {home}/evaldata --limit 1", None),
    ("benchmark", "full --model {f} --wikitext2 {home}/books/book0.txt --no-generation", None),
    ("quantize", "--model {f} --output {home}/new.bin", None),
    ("train", "--init-from {f} --data {home}/data --output-dir {home}/newrun --max-steps 1", "--init-from"),
]


@pytest.mark.parametrize("script,argv,flag", LOADERS, ids=[x[0] for x in LOADERS])
def test_every_loader_says_what_each_file_kind_is(script, argv, flag, home, capsys, monkeypatch):
    import socket
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, says in _kinds(home).items():
        before = snapshot(home)
        rc, err = run_main(script, argv.format(f=home / name, home=home, port=port), capsys)
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
        assert rc not in (0, None) and "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, err)
        assert f"{home / name} is {says}" in lines[0], (name, lines[0])
        if flag:
            assert f"{flag} {home / name}" in lines[0], lines[0]
        assert snapshot(home) == before


def test_a_gguf_export_is_named_gguf_and_a_bin_bin(home, capsys):
    for fmt, name, says in (("gguf", "x.bin", "x.gguf"), ("bin", "x.gguf", "x.bin")):
        rc, err = run_main("quantize", f"--model {home}/fishai-best.pt --format {fmt} --output {home}/{name}", capsys)
        assert rc == common.EXIT_USAGE and f"--format {fmt} file is named" in err and f"{home}/{says}" in err, err
        assert not (home / name).exists()
