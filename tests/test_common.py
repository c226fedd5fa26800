"""common.py: the CLI conventions (flags, exit codes, one-line errors), atomic files and directories,
the rules that keep a user's files safe, device/dtype resolution, the results writer."""
import os
import sys
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
    assert common.run_cli(lambda: (_ for _ in ()).throw(du.DataError("bad\nsecond line"))) == common.EXIT_USAGE
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
    for out, how in ((books, "is"), (books / "sub", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(common.FishAIError, match=f"^--output {out}: {how} the input --input {books}"):
            common.check_output_apart(out, [str(books)])
    common.check_output_apart(tmp_path / "elsewhere", [str(books), "hf:wikitext", "python-docs", "wikitext103"])
    with pytest.raises(common.FishAIError, match="contains the input --input"):
        common.check_output_apart(tmp_path, [str(books / "*.txt")])  # a glob: the folder it starts in
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
    common.check_outputs(args)
    common.write_outputs(args, {"a": 1, "名": "鱼"}, lambda r: f"# {r['a']}\n", say=False)
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{\n  "a": 1,\n  "名": "鱼"\n}\n'
    assert (tmp_path / "r.md").read_text() == "# 1\n"
    with pytest.raises(common.FishAIError, match="--json .*file exists; pass --overwrite"):
        common.check_outputs(args)
