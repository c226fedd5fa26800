"""common.py: the CLI conventions (flags, exit codes, one-line errors), atomic files and directories,
the rules that keep a user's files safe, device/dtype resolution, the results writer."""
import os
from pathlib import Path

import pytest

import common
import data_utils as du

ROOT = Path(__file__).resolve().parents[1]


def test_cli_convention_helpers(tmp_path):
    assert common.parse_size("500M") == 500_000_000 and common.parse_size("2B") == 2 * 10**9
    assert common.parse_size("1.5k") == 1500 and common.parse_size("5_000") == 5000 and common.parse_size(None) is None
    with pytest.raises(common.FishAIError, match="--target-tokens"):
        common.parse_size("lots", "--target-tokens")
    assert [common.dtype_name(x) for x in ("bfloat16", "fp16", "torch.float32", "AUTO")] == ["bf16", "fp16", "fp32", "auto"]
    with pytest.raises(common.FishAIError, match="--dtype"):
        common.dtype_name("int3")
    p = common.ArgumentParser(prog="x")
    p.add_argument("--n", type=common.int_flag(1), default=4, help="count")
    p.add_argument("--f", type=common.float_flag(0, 1, hi_open=True), default=0.5, help="fraction (default 0.5)")
    assert p.parse_args(["--n", "3"]).n == 3 and "(default: 4)" in p.format_help()
    assert p.format_help().count("default") == 2  # once per flag
    for bad in (["--n", "0"], ["--n", "x"], ["--f", "1"], ["--f", "nan"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == common.EXIT_USAGE
    assert common.run_cli(lambda: None) == 0
    assert common.run_cli(lambda: (_ for _ in ()).throw(common.DataError("bad\nsecond line"))) == common.EXIT_USAGE
    # atomic files follow the umask; a failed write keeps the old file
    old = os.umask(0o022)
    try:
        f = common.atomic_write_text(tmp_path / "a.txt", "one")
        assert (f.stat().st_mode & 0o777) == 0o644
        with pytest.raises(RuntimeError):
            common.atomic_write(f, lambda fh: (fh.write(b"half"), (_ for _ in ()).throw(RuntimeError("boom"))))
        assert f.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
        with common.atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
        assert (tmp_path / "d" / "x").read_text() == "1" and ((tmp_path / "d").stat().st_mode & 0o777) == 0o755
        with pytest.raises(common.FishAIError, match="--overwrite"):
            with common.atomic_dir(tmp_path / "d", owns=("x",)):
                pass
        with pytest.raises(RuntimeError):
            with common.atomic_dir(tmp_path / "d", overwrite=True, owns=("x", "y")) as d:
                (d / "y").write_text("2")
                raise RuntimeError("boom")
        assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x"]   # the old dir stays whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]  # no temp dirs left
    finally:
        os.umask(old)


def test_atomic_dir_rechecks_before_the_swap(tmp_path):
    # a foreign file that appears while the new directory is being built is not deleted either
    out = tmp_path / "d"
    out.mkdir()
    (out / "x").write_text("1")
    with pytest.raises(common.FishAIError, match=r"holds files that are not this command's output \(late.txt\)"):
        with common.atomic_dir(out, overwrite=True, owns=("x",)) as d:
            (d / "x").write_text("2")
            (out / "late.txt").write_text("mine")
    assert (out / "late.txt").read_text() == "mine" and (out / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_output_apart_from_inputs_and_replaceable_dir(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("x")
    folder = lambda out: common.Output(out, "--output", "prepared", owns={"a": None}, whole=True)  # noqa: E731
    for out, how in ((books, "is"), (books / "sub", "lies inside"), (tmp_path, "contains")):
        for overwrite in (False, True):  # --overwrite never lets an output replace an input
            with pytest.raises(common.FishAIError, match=f"^--output {out}: {how} the input --input {books}"):
                common.check_plan([folder(out)], [("--input", [str(books)])], overwrite)
    common.check_plan([folder(tmp_path / "elsewhere")], [("--input", [str(books), "hf:wikitext", "python-docs",
                                                                       "wikitext103", f"books={books}/a.txt"])])
    with pytest.raises(common.FishAIError, match="contains the input --input"):
        common.check_plan([folder(tmp_path)], [("--input", str(books / "*.txt"))])  # a glob: the folder it starts in
    with pytest.raises(common.FishAIError, match="lies inside the input --data"):  # NAME=PATH names a path
        common.check_plan([folder(books / "o")], [("--data", f"mine={books}")])
    common.check_replaceable_dir(tmp_path / "new", ("a",), overwrite=False)          # new: fine
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a").write_text("1")
    with pytest.raises(common.FishAIError, match="already holds x; pass --overwrite"):
        common.check_replaceable_dir(tmp_path / "mine", ("a",), overwrite=False, what="x")
    common.check_replaceable_dir(tmp_path / "mine", lambda n: n == "a", overwrite=True)
    with pytest.raises(common.FishAIError, match=r"holds files that are not x \(a\)"):
        common.check_replaceable_dir(tmp_path / "mine", ("b",), overwrite=True, what="x")


def test_resolve_device_and_dtype_without_a_gpu(monkeypatch):
    import torch
    assert common.resolve_device("auto") == torch.device("cpu") and common.resolve_device("cpu").type == "cpu"
    for bad, msg in (("cuda", "CUDA is not available"), ("tpu", "is not a device"), ("cuda:x", "is not a device")):
        with pytest.raises(common.FishAIError, match=msg):
            common.resolve_device(bad)
    assert common.resolve_dtype("auto", "cpu") == torch.float32 and common.resolve_dtype("bfloat16") == torch.bfloat16
    assert common.resolve_dtype(None) is None
    # a one-GPU machine as torch.cuda shows it: the device always comes back indexed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert common.resolve_device("cuda") == torch.device("cuda", 0) == common.resolve_device("auto")
    with pytest.raises(common.FishAIError, match=r"cuda:1: this machine has 1 GPU\(s\)"):
        common.resolve_device("cuda:1")
    assert common.autocast("cpu", torch.float32).__class__.__name__ == "nullcontext"


def test_results_writer(tmp_path):
    from argparse import Namespace
    args = Namespace(json=str(tmp_path / "r.json"), report=str(tmp_path / "r.md"), overwrite=False)
    common.check_plan(common.result_outputs(args))
    common.write_outputs(args, {"a": 1, "名": "鱼"}, lambda r: f"# {r['a']}\n", say=False)
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{\n  "a": 1,\n  "名": "鱼"\n}\n'
    assert (tmp_path / "r.md").read_text() == "# 1\n"
    with pytest.raises(common.FishAIError, match="--json .*file exists; pass --overwrite"):
        common.check_plan(common.result_outputs(args))
    common.check_plan(common.result_outputs(args), overwrite=True)  # its own kind of file: replaced


# ---------------------------------------------------------------------------------------------
# a newcomer's mistakes across the scripts (issue 23's "users-bad-inputs" check): each is refused
# with one line that starts "error:" and a non-zero exit, before any file of the user's changes

def _snapshot(root: Path) -> dict:
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def user_home(tmp_path_factory, tiny_ckpt, tiny_tokenizer_dir, training_texts):
    """What a user has after a first day: books (and notes), a tokenizer, prepared data, a checkpoint,
    an int4 .bin, an HF export, a finished run, a results file and a folder of their own files."""
    import shutil
    import quantize
    home = tmp_path_factory.mktemp("home")
    books = home / "mybooks"
    books.mkdir()
    for i in range(3):
        (books / f"book{i}.txt").write_text("\n\n".join(training_texts[i::3]), encoding="utf-8")
    (books / "notes.txt").write_text("my reading notes\n", encoding="utf-8")
    shutil.copytree(tiny_tokenizer_dir, home / "tokenizer")
    shutil.copy(tiny_ckpt, home / "fishai-best.pt")
    assert du.main(["prepare", "--input", str(books), "--tokenizer", str(home / "tokenizer"), "--output",
                    str(home / "data"), "--quiet"]) == 0
    assert quantize.main(["--model", str(home / "fishai-best.pt"), "--output", str(home / "fishai-int4.bin"),
                          "--strategy", "int4", "--quiet"]) == 0
    assert quantize.main(["--model", str(home / "fishai-best.pt"), "--output", str(home / "hf"), "--format", "hf",
                          "--quiet"]) == 0
    (home / "results.json").write_text('{"mine": 1}\n')
    (home / "mine").mkdir()
    (home / "mine" / "thesis.tex").write_text("\\section{Mine}\n")
    return home


# (script, argv with {home} for the user's folder, what the one error line says)
MISTAKES = [
    ("data_utils", "prepare --input {home}/mybooks --tokenizer {home}/tokenizer --output {home}/mybooks --overwrite",
     "--output"),
    ("data_utils", "prepare --input {home}/mybooks --tokenizer {home}/tokenizer --output {home}/mine --overwrite",
     "thesis.tex"),
    ("data_utils", "prepare --input {home}/mybooks --tokenizer {home}/tokenizer --output {home}/mybooks/out",
     "--output"),
    ("data_utils", "prepare --input {home}/fishai-best.pt --tokenizer {home}/tokenizer --output {home}/out",
     "fishai-best.pt is"),
    ("data_utils", "prepare --input {home}/data/train.bin --tokenizer {home}/tokenizer --output {home}/out",
     "prepared token file"),
    ("data_utils", "prepare --input {home}/mybooks --tokenizer {home}/nope --output {home}/out", "nope"),
    ("data_utils", "prepare --input {home}/mybooks --tokenizer {home}/tokenizer --output {home}/data", "--overwrite"),
    ("tokenizer_train", "--data {home}/fishai-int4.bin --output-dir {home}/tok2 --vocab-size 300", "fishai-int4.bin"),
    ("tokenizer_train", "--data {home}/mybooks --output-dir {home}/mine --vocab-size 300 --overwrite", "thesis.tex"),
    ("tokenizer_train", "--data {home}/mybooks --output-dir {home}/mybooks/tok --vocab-size 300", "--output-dir"),
    ("tokenizer_train", "--data {home}/mybooks --output-dir {home}/tok2 --vocab-size 10", "--vocab-size"),
    ("train", "--config tiny --data {home}/data/train.bin --tokenizer {home}/tokenizer --output-dir {home}/run",
     "--data {home}/data/"),
    ("train", "--config tiny --data {home}/data --output-dir {home}/run --seq-len 512", "--seq-len"),
    ("train", "--config tiny --data {home}/data --output-dir {home}/run --device cuda", "cuda"),
    ("train", "--config tiny --data {home}/missing.txt --output-dir {home}/run", "missing.txt"),
    ("train", "--resume {home}/fishai-int4.bin --output-dir {home}/run", "--init-from"),
    ("train", "--config huge --data {home}/data", "--config"),
    ("quantize", "--model {home}/fishai-best.pt --output {home}/mine --format hf --overwrite", "thesis.tex"),
    ("quantize", "--model {home}/fishai-best.pt --output {home}/fishai-int4.bin --strategy int8", "--overwrite"),
    ("quantize", "--model {home}/missing.pt --output {home}/q.bin", "missing.pt"),
    ("quantize", "--model {home}/fishai-best.pt --output {home}/q.bin --strategy int3", "--strategy"),
    ("generate", "--model {home}/tokenizer --prompt hi", "tokenizer"),
    ("generate", "--model {home}/fishai-best.pt --prompt hi --top-p 1.5", "--top-p"),
    ("evaluate", "--benchmark gsm8k --model {home}/fishai-best.pt --json {home}/results.json --limit 1",
     "results.json"),
    ("evaluate", "--benchmark trivia --model {home}/fishai-best.pt", "unknown benchmark 'trivia'"),
    ("quick_train", "--config tiny --data {home}/mybooks --output-dir {home}/mine --overwrite", "thesis.tex"),
    ("quick_train", "--config tiny --data {home}/data/train.bin --output-dir {home}/q --vocab-size 300",
     "prepared token file"),
    ("quick_train", "--config tiny --data {home}/mybooks --output-dir {home}/q --device cuda", "cuda"),
    ("reference_benchmark", "--models gpt2 --wikitext2 {home}/mybooks/book0.txt --json {home}/results.json",
     "results.json"),
    ("serve", "--model {home}/missing.pt", "missing.pt"),
    ("serve", "--model {home}/fishai-best.pt --port 70000", "--port"),
    ("benchmark", "full --model {home}/missing.pt", "missing.pt"),
]


@pytest.mark.parametrize("script,argv,says", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)])
def test_a_newcomers_mistakes_get_one_line_and_lose_nothing(script, argv, says, user_home, capsys, monkeypatch):
    import importlib
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    module = importlib.import_module(script)
    before = _snapshot(user_home)
    try:
        rc = module.main(argv.format(home=user_home).split())
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None) and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert says.format(home=user_home) in lines[0], lines[0]
    assert _snapshot(user_home) == before  # nothing removed, changed or left behind


def test_the_mistakes_cover_every_script_and_at_least_25_cases():
    scripts = {m[0] for m in MISTAKES}
    assert len(MISTAKES) >= 25 and scripts >= {"data_utils", "tokenizer_train", "train", "quantize", "generate",
                                               "evaluate", "quick_train", "reference_benchmark", "serve", "benchmark"}
