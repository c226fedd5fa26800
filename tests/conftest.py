"""Shared fixtures: real shared data (skipped when absent), a tiny real tokenizer, tiny models.

Everything is session-scoped and small (a ~130K-parameter model) so the suite runs on a
2-core CPU in minutes.
"""
import math
import sys
from pathlib import Path

import os

# The test models are tiny: one thread per process is faster than two (no thread sync per op)
# and keeps tests that start subprocesses (CLI, torchrun) from oversubscribing the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The real benchmark files sit in ../shared/data beside the checkout (CI has them too). Set
# FISHAI_SHARED_DATA to another folder, or to "none" to run the suite as a fresh clone without them
# (.ci/run does both).
_SHARED_ENV = os.environ.get("FISHAI_SHARED_DATA", "")
SHARED_DATA = (Path(_SHARED_ENV) if _SHARED_ENV and _SHARED_ENV.lower() != "none"
               else Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED_HIDDEN = _SHARED_ENV.lower() == "none"


def shared_available() -> bool:
    return not SHARED_HIDDEN and (SHARED_DATA / "SOURCES.md").is_file()
# ---- the CUDA tests: real commands on a GPU (python -m pytest tests -m cuda). Without a GPU they skip;
# FISHAI_CUDA_TESTS_DEVICE=cpu runs the same commands on the CPU, a dry run of the tests themselves.
CUDA_TESTS_DEVICE = os.environ.get("FISHAI_CUDA_TESTS_DEVICE", "cuda")
SHRINK = ["--model-override", "d_model=64", "--model-override", "n_layers=2", "--model-override", "n_heads=4",
          "--model-override", "n_kv_heads=2", "--model-override", "d_ff=192", "--model-override", "max_seq_len=128"]


# ---- a small random GPT for the model, engine and optimizer tests (2 layers, GQA, 64-token context)
NET_SHAPE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=64)


@pytest.fixture()
def net():
    from model import GPT, ModelConfig
    torch.manual_seed(0)
    return GPT(ModelConfig(**NET_SHAPE)).eval()


def tokens(b, t, seed=0, vocab=256):
    """(b, t) random token ids, the same for the same seed."""
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (python -m pytest tests -m cuda); skipped "
                                       "without one")


def pytest_collection_modifyitems(config, items):
    if CUDA_TESTS_DEVICE != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (FISHAI_CUDA_TESTS_DEVICE=cpu dry-runs these commands on "
                                   "the CPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def run_script(script: str, *args, stdin: str | None = None, timeout: int = 300, env: dict | None = None):
    """Run one of the project's scripts as a user types it (a child process, in the repo root)."""
    import subprocess
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=e, cwd=ROOT)


def assert_parser_refuses(main, argv, flag, capsys):
    """main(argv) with one bad flag value: argparse's exit 2 and one line naming the flag."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: argument {flag}"), lines


def in_child_process(fn):
    """Run a test that calls into a native peer (llama.cpp) in a forked child: a native crash (its
    AMX kernel's SIGSEGV on some CPUs) fails that one test with the reason instead of killing pytest."""
    import functools
    import multiprocessing
    import signal
    import traceback

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = multiprocessing.get_context("fork")
        result = ctx.SimpleQueue()

        def child():
            try:
                fn(*args, **kwargs)
                result.put(None)
            except pytest.skip.Exception as e:  # a skip (peer not installed) stays a skip
                result.put(("skip", str(e)))
            except BaseException:  # noqa: BLE001 - the failure travels back to the parent
                result.put(("fail", traceback.format_exc()))
        p = ctx.Process(target=child)
        p.start()
        p.join(600)
        if p.exitcode is None:
            p.kill()
            pytest.fail("the test's child process did not finish in 600 s")
        if p.exitcode < 0:
            pytest.fail(f"the native peer crashed ({signal.Signals(-p.exitcode).name}); llama.cpp's AMX kernel "
                        "does on some CPUs: build llama-cpp-python without AMX (README, 'llama.cpp')")
        outcome = None if result.empty() else result.get()
        if outcome and outcome[0] == "skip":
            pytest.skip(outcome[1])
        if outcome:
            pytest.fail(outcome[1], pytrace=False)
    return wrapper


@pytest.fixture(scope="session")
def gpu():
    """The device of the CUDA tests: "cuda", or "cpu" for their dry run."""
    return CUDA_TESTS_DEVICE


@pytest.fixture(scope="session")
def gpu_trained(tmp_path_factory, tiny_tokenizer_dir, text_file, gpu):
    """A tiny model trained by train.py on the GPU (the recipe's Muon + WSD, bf16, eager): the run
    directory whose fishai-best.pt the other CUDA tests quantize, generate from and evaluate."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    r = run_script("train.py", "--config", "tiny", *SHRINK, "--tokenizer", tiny_tokenizer_dir, "--data", text_file,
                   "--output-dir", out, "--seq-len", 64, "--batch-size", 16, "--grad-accum", 1, "--max-steps", 300,
                   "--eval-interval", 100, "--eval-iters", 4, "--device", gpu, "--no-compile", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# The opening of the Analects (public domain): no spaces between words, one "word" per line; and
# an English paragraph (test_scoring.py, test_benchmark.py: character- vs word-level figures).
ZH_TEXT = ("子曰：學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？人不知而不慍，不亦君子乎？\n"
           "有子曰：其為人也孝弟，而好犯上者，鮮矣；不好犯上，而好作亂者，未之有也。君子務本，本立而道生。\n"
           "子曰：巧言令色，鮮矣仁！\n"
           "曾子曰：吾日三省吾身：為人謀而不忠乎？與朋友交而不信乎？傳不習乎？\n")
EN_TEXT = ("The history of the city began in the Roman period, when a small fort was built on the river. "
           "In the twelfth century the town received a charter, and its market grew quickly.\n")

TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=128)


@pytest.fixture(scope="session")
def shared_data():
    if not shared_available():
        why = "hidden by FISHAI_SHARED_DATA=none" if SHARED_HIDDEN else f"not found at {SHARED_DATA}"
        pytest.skip(f"shared benchmark data {why} (it sits beside the checkout in CI)")
    return SHARED_DATA


def _training_texts():
    """Real text for the tiny tokenizer and the trained fixture model: WikiText-103 valid when
    the shared data is there, else the Python documentation bundled with Python, cut into its
    paragraphs so that both sources give many paragraph-sized documents (the tests hold out
    every n-th document)."""
    wiki = SHARED_DATA / "wikitext103" / "wiki.valid.tokens"
    if shared_available() and wiki.is_file():
        text = wiki.read_text(encoding="utf-8")
        return [p for p in text.split("\n \n") if p.strip()]
    from readers import iter_documents
    docs, size = [], 0
    for d in iter_documents("python-docs"):
        for para in d.split("\n\n"):
            if len(para.strip()) >= 200:
                docs.append(para)
                size += len(para)
        if size > 1_200_000:
            break
    return docs


@pytest.fixture(scope="session")
def training_texts():
    return _training_texts()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, training_texts):
    from tokenizer_train import train_tokenizer
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(training_texts, 512, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from text_tokenizer import load_tokenizer
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    from model import ModelConfig
    vocab = int(math.ceil(tiny_tokenizer.vocab_size / 64) * 64)
    return ModelConfig(**{**TINY, "vocab_size": vocab})


@pytest.fixture(scope="session")
def tiny_model(tiny_config, tiny_tokenizer):
    from model import GPT
    torch.manual_seed(1234)
    model = GPT(tiny_config).eval()
    model.tokenizer = tiny_tokenizer
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model):
    from model import save_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "tiny-random.pt"
    save_checkpoint(path, tiny_model)
    return path


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory, tiny_config, tiny_tokenizer, training_texts):
    """The tiny model trained for 300 steps on real text (a few seconds on CPU)."""
    import numpy as np
    from token_data import TokenWindowSampler
    from model import GPT, save_checkpoint
    from optim import configure_optimizers
    torch.manual_seed(0)
    ids = []
    for doc in tiny_tokenizer.encode_batch(training_texts):
        ids.extend(doc)
        ids.append(tiny_tokenizer.eos_id)
    tokens = np.asarray(ids, dtype=np.uint16)
    model = GPT(tiny_config)
    model.tokenizer = tiny_tokenizer
    opt = configure_optimizers(model, weight_decay=0.1, lr=3e-3)
    sampler = TokenWindowSampler(tokens, seq_len=64, batch_size=16, seed=0)
    steps = 300
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sampler.next_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    path = tmp_path_factory.mktemp("trained") / "tiny-trained.pt"
    save_checkpoint(path, model, step=steps, extra={"final_train_loss": float(loss.detach())})
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, training_texts):
    """~150 KB of real text, one document per blank-line-separated block."""
    docs, size = [], 0
    for d in training_texts:
        d = "\n".join(line for line in d.splitlines() if line.strip())
        if d:
            docs.append(d)
            size += len(d)
        if size > 150_000:
            break
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path
