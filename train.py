"""
Train a FishAI model: pretraining or chat SFT, on one CPU/GPU or many GPUs/nodes via torchrun.

Usage (copy-paste):

  # pretrain the seed's FishAI-Small on a prepared dataset (data_utils.py prepare -> data/)
  python train.py --config small --data data/ --output-dir checkpoints --batch-size 4 \
      --grad-accum 8 --lr 5e-4 --warmup 100 --max-steps 10000 --seq-len 512 --device cuda

  # raw text (txt / jsonl / parquet / hf:NAME / python-docs) is tokenized on the fly
  python train.py --config tiny --data python-docs --tokenizer tokenizer/ --max-steps 300 --device cpu

  # continue an interrupted run exactly where it stopped (latest checkpoint in --output-dir)
  python train.py --config small --data data/ --output-dir checkpoints --resume auto

  # several GPUs (or CPU processes with gloo); elastic restarts resume from fishai-latest.pt
  torchrun --nproc_per_node 8 --max-restarts 1 train.py --config small --data data/ --resume auto

  # chat SFT with assistant-only loss, starting from a pretrained checkpoint
  python train.py --stage sft --init-from checkpoints/fishai-best.pt --data chat.jsonl \
      --output-dir checkpoints-sft --max-steps 500 --lr 1e-4

Outputs in --output-dir: fishai-latest.pt (every --save-interval steps, on Ctrl-C and at the
end), fishai-best.pt (whenever the validation loss improves) and metrics.jsonl (one JSON
object per log/eval line). Checkpoints are written atomically, so a killed run always
leaves a loadable fishai-latest.pt.

Fault-injection hooks (environment variables, used by the tests; see README.md, "Train a model"):
FISHAI_FAULT_NAN_FROM_STEP, FISHAI_FAULT_OOM_AT_STEP, FISHAI_FAULT_EXIT_AT_STEP (+
FISHAI_FAULT_EXIT_RANK, FISHAI_FAULT_MARKER).
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LATEST_NAME = "fishai-latest.pt"
BEST_NAME = "fishai-best.pt"
METRICS_NAME = "metrics.jsonl"
VOCAB_MULTIPLE = 64  # pad the embedding to a multiple of 64 so the vocab matmul uses fast kernels


class TrainError(Exception):
    """A bad flag/input or an unrecoverable training problem; main() prints it as one line."""


# ----------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain or SFT a FishAI (LLaMA-style) model. Single process or torchrun (DDP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--config", default=None,
                   help="model preset from model.py: tiny, small, medium, large (default small; with --resume "
                        "the checkpoint's config, checked against --config when given)")
    g.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one field of the preset (repeatable), e.g. --model-override d_model=128 "
                        "--model-override n_layers=2; fields: vocab_size d_model n_layers n_heads n_kv_heads "
                        "d_ff max_seq_len rope_theta norm_eps init_std")
    g.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain",
                   help="pretrain: next-token loss on all tokens; sft: chat data, loss on assistant tokens only")
    g.add_argument("--data", default=None,
                   help="prepared dir (train.bin/val.bin/meta.json from data_utils.py prepare; default ./data "
                        "when it holds one), or raw text "
                        "tokenized on the fly: .txt/.jsonl/.parquet file, dir, glob, hf:NAME[:CONFIG[:SPLIT]] "
                        "or python-docs. For --stage sft: a chat .jsonl")
    g.add_argument("--val-data", default=None,
                   help="raw validation text/chat file; default: every 20th document of --data is held out")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer dir (tokenizer_train.py) for raw --data; a prepared dir's own tokenizer/ "
                        "is used when omitted; with --init-from/--resume the checkpoint's tokenizer is used")
    g.add_argument("--text-key", default="text", help="field holding the text in jsonl/parquet/HF data")
    g.add_argument("--max-data-tokens", type=int, default=None,
                   help="stop tokenizing raw --data after this many tokens (bounds HF streaming datasets)")
    g.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (fresh optimizer/schedule); required for sft")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=8, help="micro-batches accumulated per optimizer step")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: min(512, the model's max_seq_len))")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 pretrain, 1e-4 sft)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at min_lr_ratio * lr")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    g.add_argument("--max-steps", type=int, default=10000, help="optimizer steps in total (incl. resumed ones)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (2-D matmul weights only)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save fishai-latest.pt and exit once this step is reached, keeping the schedule of "
                        "--max-steps (time-sliced/preemptible jobs; continue later with --resume)")
    g.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                   help="evaluate, save fishai-latest.pt and stop after this much wall time (cluster time "
                        "limits, time-boxed runs); continue later with --resume")
    g.add_argument("--max-nonfinite", type=int, default=10,
                   help="stop after this many consecutive steps with a NaN/inf loss")
    g.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("evaluation, checkpoints and logging")
    g.add_argument("--output-dir", default="checkpoints", help="where checkpoints and metrics.jsonl go")
    g.add_argument("--eval-interval", type=int, default=250, help="evaluate on the val split every N steps")
    g.add_argument("--eval-iters", type=int, default=50, help="val batches per evaluation")
    g.add_argument("--save-interval", type=int, default=250, help="write fishai-latest.pt every N steps")
    g.add_argument("--log-interval", type=int, default=10, help="write a metrics line every N steps")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="resume from a checkpoint; 'auto' (or no value) = <output-dir>/fishai-latest.pt "
                        "if it exists, else start fresh")
    g.add_argument("--overwrite", action="store_true",
                   help="allow starting a fresh run in an --output-dir that already holds checkpoints")
    g.add_argument("--wandb", action="store_true", help="log config, metrics and the final checkpoint to wandb")
    g.add_argument("--wandb-project", default="fishai-train")
    g.add_argument("--wandb-run-name", default=None)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA if supported else fp16 (+GradScaler); fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- schedule / rng

class CosineSchedule:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at `max_steps`.

    Stateless apart from the step counter; state_dict() holds plain numbers so a
    checkpoint stays loadable with torch.load(weights_only=True)."""

    def __init__(self, lr: float, warmup: int, max_steps: int, min_lr_ratio: float = 0.1):
        self.lr, self.warmup, self.max_steps, self.min_lr_ratio = float(lr), int(warmup), int(max_steps), float(min_lr_ratio)
        self.step = 0

    def lr_at(self, step: int) -> float:
        min_lr = self.lr * self.min_lr_ratio
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        if step >= self.max_steps:
            return min_lr
        ratio = (step - self.warmup) / max(1, self.max_steps - self.warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - min_lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "warmup": self.warmup, "max_steps": self.max_steps,
                "min_lr_ratio": self.min_lr_ratio, "step": self.step}

    def load_state_dict(self, d: dict) -> None:
        # Only the position is restored: the user may change --max-steps/--lr on resume on purpose.
        self.step = int(d["step"])


def get_rng_state() -> dict:
    """All RNG states as tensors/primitives (torch.load(weights_only=True) safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def parse_overrides(items: list[str]) -> dict:
    """['d_model=128', 'rope_theta=5e5'] -> {'d_model': 128, 'rope_theta': 500000.0}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise TrainError(f"--model-override {item!r}: expected KEY=VALUE, e.g. d_model=128")
        try:
            out[key] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise TrainError(f"--model-override {item!r}: {value!r} is not a number")
    return out


def build_config(fishai, name: str, vocab_size: int | None, overrides: dict):
    """Preset + overrides; the vocab comes from the tokenizer (rounded up) unless overridden."""
    kw = dict(overrides)
    if vocab_size is not None and "vocab_size" not in kw:
        kw["vocab_size"] = vocab_size
    try:
        return fishai.get_config(name, **kw)
    except (TypeError, ValueError) as e:
        raise TrainError(f"--config {name}: {e}")


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return ((int(n) + multiple - 1) // multiple) * multiple


# ----------------------------------------------------------------------------- device / dist

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, dist: Dist | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if dist is not None and dist.enabled:
            dev = torch.device("cuda", dist.local_rank)  # one GPU per torchrun worker
        torch.cuda.set_device(dev)
    elif dev.type != "cpu" and dev.type != "mps":
        raise TrainError(f"--device {name!r} is not supported; use auto, cpu or cuda")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU autocast is slower than fp32 for these small matmuls
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def setup_distributed(backend: str | None = None) -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist
    if not tdist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            # torchrun shares its rendezvous TCPStore with the workers across elastic restarts, so
            # the keys of a failed attempt (e.g. the old rank 0's gloo address) are still there and a
            # restarted worker may connect to a dead peer. A per-attempt key prefix avoids that race.
            from datetime import timedelta
            rank = int(os.environ["RANK"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=(not agent_store and rank == 0), timeout=timedelta(minutes=10))
            store = tdist.PrefixStore(f"fishai/attempt_{restart}", base)
            tdist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        else:
            tdist.init_process_group(backend=backend)
    return Dist(rank=tdist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                world_size=tdist.get_world_size())


def _all_reduce_mean(value: float, dist: Dist, device: torch.device) -> float:
    if not dist.enabled:
        return value
    import torch.distributed as tdist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.item() / dist.world_size


def _all_reduce_sum_tensor(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        import torch.distributed as tdist
        tdist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- fault hooks

def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


class FaultHooks:
    """Test-only fault injection, driven by environment variables (all unset in normal use).

    FISHAI_FAULT_NAN_FROM_STEP=k   the training loss becomes NaN from step k on
    FISHAI_FAULT_OOM_AT_STEP=k     raise torch.cuda.OutOfMemoryError at step k
    FISHAI_FAULT_EXIT_AT_STEP=k    os._exit(17) at step k on rank FISHAI_FAULT_EXIT_RANK (default 1),
                                   once: only if the file FISHAI_FAULT_MARKER does not exist yet (it is
                                   created first), so an elastic restart runs through.
    """

    def __init__(self):
        self.nan_from = _env_int("FISHAI_FAULT_NAN_FROM_STEP")
        self.oom_at = _env_int("FISHAI_FAULT_OOM_AT_STEP")
        self.exit_at = _env_int("FISHAI_FAULT_EXIT_AT_STEP")
        self.exit_rank = _env_int("FISHAI_FAULT_EXIT_RANK")
        self.marker = os.environ.get("FISHAI_FAULT_MARKER")

    def before_step(self, step: int, rank: int) -> None:
        if self.oom_at is not None and step == self.oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by FISHAI_FAULT_OOM_AT_STEP)")
        if self.exit_at is not None and step == self.exit_at and rank == (1 if self.exit_rank is None else self.exit_rank):
            if self.marker:
                if os.path.exists(self.marker):
                    return
                Path(self.marker).write_text(f"rank {rank} exited at step {step}\n")
            sys.stderr.write(f"[fault injection] rank {rank} exits at step {step}\n")
            sys.stderr.flush()
            os._exit(17)

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.nan_from is not None and step >= self.nan_from:
            return loss * float("nan")
        return loss


# ----------------------------------------------------------------------------- data

def tokenize_documents(docs, tokenizer, max_tokens: int | None = None, desc: str = "tokenizing",
                       show_progress: bool = True) -> np.ndarray:
    """Encode documents (batched, the Rust tokenizer is parallel) and join them with EOS."""
    from tqdm import tqdm
    eos = tokenizer.eos_id
    chunks: list[np.ndarray] = []
    total = 0
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    batch: list[str] = []

    def flush():
        nonlocal total
        for ids in tokenizer.encode_batch(batch):
            ids.append(eos)
            chunks.append(np.asarray(ids, dtype=dtype))
            total += len(ids)
        batch.clear()

    bar = tqdm(desc=desc, unit=" docs", disable=not show_progress, mininterval=1.0)
    for doc in docs:
        if not doc:
            continue
        batch.append(doc)
        bar.update(1)
        if len(batch) >= 512:
            flush()
            bar.set_postfix(tokens=total)
            if max_tokens is not None and total >= max_tokens:
                break
    if batch:
        flush()
    bar.close()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return tokens


def _split_documents(docs, every: int = 20):
    """Deterministic document-level split: every `every`-th document goes to validation."""
    train, val = [], []
    for i, d in enumerate(docs):
        (val if i % every == every - 1 else train).append(d)
    return train, val


def is_prepared_dir(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.exists(os.path.join(path, "train.bin"))


def load_pretrain_tokens(args, tokenizer, show_progress: bool, model_vocab: int):
    """-> (train_tokens, val_tokens) as 1-D integer arrays (memmaps for prepared dirs)."""
    import data_utils
    if is_prepared_dir(args.data):
        d = Path(args.data)
        if tokenizer is not None:
            data_utils.check_meta(d, tokenizer)  # refuses a .bin made with another tokenizer
        else:
            meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
            if int(meta.get("vocab_size", 0)) > model_vocab:
                raise TrainError(f"--data {d}: token vocab {meta.get('vocab_size')} > model vocab {model_vocab}; "
                                 "pass the data's --tokenizer")
        train = data_utils.read_token_file(d / "train.bin")
        val_path = d / "val.bin"
        if args.val_data:
            if tokenizer is None:
                raise TrainError("--val-data is raw text and needs a tokenizer; pass --tokenizer")
            val = tokenize_documents(data_utils.iter_documents(args.val_data, text_key=args.text_key),
                                     tokenizer, desc="tokenizing val", show_progress=show_progress)
        elif val_path.exists() and data_utils.read_token_header(val_path)["n_tokens"] > 0:
            val = data_utils.read_token_file(val_path)
        else:
            raise TrainError(f"--data {d}: val.bin is missing or empty; prepare with --val-fraction > 0 "
                             "or pass --val-data FILE")
        _check_token_range(train, tokenizer.vocab_size if tokenizer is not None else model_vocab, d / "train.bin")
        return train, val
    docs = data_utils.iter_documents(args.data, text_key=args.text_key)
    if args.val_data:
        train = tokenize_documents(docs, tokenizer, args.max_data_tokens, "tokenizing train", show_progress)
        val = tokenize_documents(data_utils.iter_documents(args.val_data, text_key=args.text_key),
                                 tokenizer, None, "tokenizing val", show_progress)
        return train, val
    docs = list(_bounded_docs(docs, args.max_data_tokens))
    train_docs, val_docs = _split_documents(docs)
    if not val_docs:  # a single document: hold out its tail instead
        train_docs, val_docs = docs, []
    train = tokenize_documents(train_docs, tokenizer, None, "tokenizing train", show_progress)
    val = tokenize_documents(val_docs, tokenizer, None, "tokenizing val", show_progress)
    if len(val) == 0 and len(train) > 0:
        cut = int(len(train) * 0.95)
        train, val = train[:cut], train[cut:]
    return train, val


def _bounded_docs(docs, max_tokens):
    # Rough bound before tokenizing (~4 chars per token) so HF streaming data is not read forever.
    if max_tokens is None:
        yield from docs
        return
    budget = max_tokens * 5
    for d in docs:
        yield d
        budget -= len(d)
        if budget <= 0:
            return


def _check_token_range(tokens, vocab_size: int, path):
    # Cheap guard on a sample: ids beyond the vocab mean the file came from another tokenizer.
    sample = np.asarray(tokens[: min(len(tokens), 1_000_000)])
    if len(sample) and int(sample.max()) >= vocab_size:
        raise TrainError(f"{path}: token id {int(sample.max())} >= vocab {vocab_size}; "
                         "the data was made with a different tokenizer, re-run prepare with this one")


# ----------------------------------------------------------------------------- checkpoint helpers

def _ckpt_config_dict(ckpt: dict) -> dict:
    for key in ("config", "model_config"):
        if key in ckpt:
            return dict(ckpt[key])
    raise TrainError("checkpoint has no model config")


def _config_diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}={a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _tokenizer_from_ckpt(ckpt: dict, path):
    import data_utils
    tok = ckpt.get("tokenizer")
    if not tok:
        return None
    try:
        return data_utils.TextTokenizer.from_dict(tok)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise TrainError(f"{path}: embedded tokenizer cannot be loaded ({e})")


def _check_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"--output-dir {path} is not writable ({e.strerror or e}); choose another directory")


# ----------------------------------------------------------------------------- metrics / wandb

class MetricsLog:
    """metrics.jsonl writer (rank 0); on resume, lines past the resumed step are dropped because
    those steps are trained again."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled, self.f = path, enabled, None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step and rec.get("event") != "end":
                    kept.append(line)
            from data_utils import atomic_write_text
            atomic_write_text(path, "".join(k + "\n" for k in kept))
            self.f = open(path, "a")
        else:
            self.f = open(path, "w")

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def read_metrics(path) -> list[dict]:
    """Parse a metrics.jsonl (skipping a torn last line)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class WandbLogger:
    def __init__(self, args, enabled: bool, config: dict, output_dir: Path):
        self.run = None
        if not enabled:
            return
        try:
            import wandb  # lazy: only when --wandb is given
        except ImportError:
            raise TrainError("--wandb needs the wandb package: pip install wandb")
        self.wandb = wandb
        self.run = wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=config,
                              dir=os.environ.get("WANDB_DIR", str(output_dir)), resume="allow")

    def log(self, rec: dict, step: int):
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}, step=step)

    def finish(self, summary: dict):
        if self.run is not None:
            for k, v in summary.items():
                self.run.summary[k] = v
            self.run.finish()
            self.run = None


# ----------------------------------------------------------------------------- training

class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, saves and exits.
    A second Ctrl-C interrupts immediately."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


@torch.no_grad()
def evaluate_pretrain(model, val_tokens, seq_len, batch_size, eval_iters, device, autocast_ctx, dist: Dist) -> float:
    """Mean loss over the first `eval_iters` contiguous val batches, sharded over ranks."""
    import data_utils
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(data_utils.iter_eval_batches(val_tokens, seq_len, batch_size, max_batches=eval_iters)):
        if i % dist.world_size != dist.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast_ctx():
            _, loss = model(x, y)
        n = y.numel()
        total[0] += loss.double() * n
        total[1] += n
    _all_reduce_sum_tensor(total, dist)
    model.train(was_training)
    if total[1] == 0:
        raise TrainError(f"the validation split is shorter than one sequence of {seq_len + 1} tokens; "
                         "lower --seq-len or give more --val-data")
    return (total[0] / total[1]).item()


@torch.no_grad()
def evaluate_sft(model, make_val_dataset, eval_iters, device, autocast_ctx, dist: Dist) -> float:
    """Assistant-token loss over `eval_iters` batches of a freshly seeded val SFTDataset (deterministic)."""
    was_training = model.training
    model.eval()
    ds = make_val_dataset()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(eval_iters):
        x, y, mask, doc_ids = ds.next_batch(device)
        with autocast_ctx():
            _, loss = model(x, y, loss_mask=mask, doc_ids=doc_ids)
        n = float(mask.sum().item())
        if n > 0 and torch.isfinite(loss):
            total[0] += loss.double() * n
            total[1] += n
    _all_reduce_sum_tensor(total, dist)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by `args` (see build_parser). Returns a summary dict:
    steps, tokens, best_val_loss, last_val_loss, elapsed_s, latest/best checkpoint paths,
    interrupted (signal name or None)."""
    import model as fishai
    import data_utils

    dist = setup_distributed()
    ok = False
    try:
        summary = _train(args, dist, fishai, data_utils)
        ok = True
        return summary
    finally:
        if dist.enabled:
            import torch.distributed as tdist
            if tdist.is_initialized():
                if ok:
                    # every rank reaches the end before any tears the group down: a rank that
                    # destroys its gloo context while a peer still talks to it can crash the peer
                    tdist.barrier()
                tdist.destroy_process_group()


def _train(args, dist: Dist, fishai, data_utils) -> dict:
    t_start = time.time()
    master = dist.master
    show_progress = master and not args.no_progress
    log = (lambda msg: print(msg, flush=True)) if master else (lambda msg: None)
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "save_interval",
                 "log_interval"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.data is None:
        # the seed's command has no --data: use what `data_utils.py prepare --output data/` wrote
        if args.stage == "pretrain" and (Path("data") / "train.bin").is_file():
            args.data = "data"
            if os.environ.get("RANK", "0") == "0":
                print("--data not given: using the prepared dataset in ./data", flush=True)
        else:
            raise TrainError("--data not given and ./data has no train.bin: run `python data_utils.py prepare "
                             "--input ... --tokenizer tokenizer/ --output data/` first, or pass --data (a prepared "
                             "dir, a text/jsonl/parquet file, hf:NAME or python-docs)")
    if args.stage == "sft" and not args.init_from and args.resume is None:
        raise TrainError("--stage sft needs --init-from CHECKPOINT (a pretrained model and its tokenizer)")
    lr = args.lr if args.lr is not None else (1e-4 if args.stage == "sft" else 5e-4)
    overrides = parse_overrides(args.model_override)
    build_config(fishai, args.config or "small", None, overrides)  # fail fast on an unknown preset/field

    device = resolve_device(args.device, dist)
    ptdtype = resolve_dtype(args.dtype, device)
    out = Path(args.output_dir)
    if master:
        _check_writable_dir(out)

    # ---- which checkpoint do we start from?
    resume_path = None
    if args.resume is not None:
        resume_path = out / LATEST_NAME if args.resume == "auto" else Path(args.resume)
        if args.resume == "auto" and not resume_path.exists():
            log(f"--resume auto: no {resume_path} yet, starting a fresh run")
            resume_path = None
        elif not resume_path.exists():
            raise TrainError(f"--resume {resume_path}: no such checkpoint")
    elif master and (out / LATEST_NAME).exists() and not args.overwrite:
        raise TrainError(f"--output-dir {out} already holds {LATEST_NAME}; pass --resume auto to continue it "
                         "or --overwrite to start over (its checkpoints will be replaced)")
    ckpt = fishai.load_checkpoint(str(resume_path)) if resume_path else None
    init = None
    if ckpt is None and args.init_from:
        if not os.path.exists(args.init_from):
            raise TrainError(f"--init-from {args.init_from}: no such checkpoint")
        init = fishai.load_checkpoint(args.init_from)

    # ---- tokenizer: checkpoint's > --tokenizer > prepared dir's own
    tokenizer = None
    source = ckpt or init
    if source is not None:
        tokenizer = _tokenizer_from_ckpt(source, resume_path or args.init_from)
        if tokenizer is not None and args.tokenizer:
            other = data_utils.load_tokenizer(args.tokenizer)
            if other.hash != tokenizer.hash:
                raise TrainError(f"--tokenizer {args.tokenizer} differs from the one in checkpoint "
                                 f"{resume_path or args.init_from}; drop --tokenizer (the checkpoint's is used)")
    elif args.tokenizer:
        tokenizer = data_utils.load_tokenizer(args.tokenizer)
    elif is_prepared_dir(args.data) and (Path(args.data) / "tokenizer" / "tokenizer.json").exists():
        tokenizer = data_utils.load_tokenizer(Path(args.data) / "tokenizer")
    if tokenizer is None and not is_prepared_dir(args.data):
        raise TrainError(f"--data {args.data}: raw text needs a tokenizer; pass --tokenizer DIR (train one with "
                         "tokenizer_train.py) or prepare the data with data_utils.py")
    vocab = round_up(tokenizer.vocab_size) if tokenizer is not None else None  # None: the preset's vocab

    # ---- model config: vocab from the tokenizer (rounded up); the preset's only without a tokenizer
    config_name = args.config or "small"
    if ckpt is not None:
        cfg = fishai.ModelConfig.from_dict(_ckpt_config_dict(ckpt))
        want, against = None, None
        if args.init_from and os.path.exists(args.init_from):
            want = fishai.ModelConfig.from_dict(_ckpt_config_dict(fishai.load_checkpoint(args.init_from)))
            against = f"--init-from {args.init_from}"
        elif args.config is not None or overrides:
            want = build_config(fishai, config_name, vocab, overrides)
            against = f"--config {config_name}" + (" with --model-override" if overrides else "")
        if want is not None:
            diff = _config_diff(cfg.to_dict(), want.to_dict())
            if diff:
                raise TrainError(f"--resume {resume_path}: the checkpoint's model config differs from {against} "
                                 f"({'; '.join(diff[:4])}); use the same --config or a new --output-dir")
        config_name = args.config or "from checkpoint"
    elif init is not None:
        cfg = fishai.ModelConfig.from_dict(_ckpt_config_dict(init))
        config_name = f"from {args.init_from}"
    else:
        cfg = build_config(fishai, config_name, vocab, overrides)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise TrainError(f"tokenizer vocab {tokenizer.vocab_size} > model vocab {cfg.vocab_size}; "
                         "the model must be built for this tokenizer")
    seq_len = args.seq_len if args.seq_len is not None else min(512, cfg.max_seq_len)
    if seq_len < 2 or seq_len > cfg.max_seq_len:
        raise TrainError(f"--seq-len {seq_len} must be between 2 and the model's max_seq_len "
                         f"{cfg.max_seq_len} (config {config_name})")

    # ---- data
    if args.stage == "pretrain":
        train_tokens, val_tokens = load_pretrain_tokens(args, tokenizer, show_progress, cfg.vocab_size)
        if len(train_tokens) < seq_len + 1:
            raise TrainError(f"--data {args.data}: only {len(train_tokens)} training tokens, fewer than "
                             f"--seq-len + 1 = {seq_len + 1}; give more data or lower --seq-len")
        if len(val_tokens) < seq_len + 1:
            raise TrainError(f"--data {args.data}: only {len(val_tokens)} validation tokens, fewer than "
                             f"--seq-len + 1 = {seq_len + 1}; give --val-data or lower --seq-len")
        sampler = data_utils.TokenWindowSampler(train_tokens, seq_len, args.batch_size, seed=args.seed,
                                                rank=dist.rank, world_size=dist.world_size)
        n_train_tokens = int(len(train_tokens))
    else:
        if is_prepared_dir(args.data):
            raise TrainError(f"--stage sft --data {args.data}: expected a chat .jsonl file, got a prepared dir")
        if tokenizer is None:
            raise TrainError(f"--stage sft: checkpoint {args.init_from} has no embedded tokenizer; the chat "
                             "template needs one (pass --tokenizer DIR)")
        train_convs, val_convs = _load_sft_conversations(args, data_utils, dist.world_size)
        sampler = data_utils.SFTDataset(train_convs, tokenizer, seq_len, args.batch_size, pack=True,
                                        seed=args.seed, rank=dist.rank, world_size=dist.world_size)
        n_train_tokens = None

        def make_val_dataset():
            return data_utils.SFTDataset(val_convs, tokenizer, seq_len, args.batch_size, pack=True,
                                         seed=args.seed + 1, rank=dist.rank, world_size=dist.world_size)

    # ---- model / optimizer / scaler
    torch.manual_seed(args.seed + dist.rank)
    random.seed(args.seed + dist.rank)
    np.random.seed((args.seed + dist.rank) % 2**32)
    model = fishai.GPT(cfg)
    if source is not None:
        fishai.load_state_checked(model, source["model"], source=str(resume_path or args.init_from))
    model.tokenizer = tokenizer
    model.to(device)
    optimizer = fishai.configure_optimizers(model, weight_decay=args.weight_decay, lr=lr,
                                            betas=(args.beta1, args.beta2), device_type=device.type)
    schedule = CosineSchedule(lr, args.warmup, args.max_steps, args.min_lr_ratio)
    use_scaler = ptdtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    step = 0
    tokens_per_step_guess = args.batch_size * args.grad_accum * dist.world_size * seq_len
    tokens_seen = 0
    best_val = None
    if ckpt is not None:
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            schedule.load_state_dict(ckpt["scheduler"])
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt.get("step", 0))
        tokens_seen = int((ckpt.get("extra") or {}).get("tokens_seen", step * tokens_per_step_guess))
        best_val = ckpt.get("best_val_loss")
        data_state = ckpt.get("data_state")
        if data_state:
            states = data_state.get("ranks") or [data_state]
            if int(data_state.get("world_size", 1)) == dist.world_size and len(states) > dist.rank:
                sampler.load_state_dict(states[dist.rank])
            else:
                log(f"note: checkpoint data position was saved with world_size={data_state.get('world_size')}, "
                    f"now {dist.world_size}; every rank continues from rank 0's data position")
                _load_sampler_state_other_world(sampler, states[0], dist)
        rng = ckpt.get("rng")
        if rng and int(rng.get("world_size", 1)) == dist.world_size and len(rng.get("ranks", [])) > dist.rank:
            set_rng_state(rng["ranks"][dist.rank])
        log(f"resumed from {resume_path} at step {step}" + (f" (best val loss {best_val:.4f})" if best_val else ""))
    elif init is not None:
        log(f"initialised weights from {args.init_from} (step {init.get('step', '?')}); fresh optimizer")

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_kw = {"device_ids": [device.index] if device.type == "cuda" else None}
        # the only buffers are the RoPE tables, identical on every rank: no per-forward broadcast
        import inspect
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            ddp_kw["forward_sync_buffers"] = False
        else:
            ddp_kw["broadcast_buffers"] = False
        model = DDP(model, **ddp_kw)

    def autocast_ctx():
        if ptdtype == torch.float32:
            return contextlib.nullcontext()
        return torch.amp.autocast(device_type=device.type, dtype=ptdtype)

    tokens_per_step = args.batch_size * args.grad_accum * dist.world_size * seq_len
    peak_flops = fishai.device_peak_flops(device, ptdtype)
    log(f"model: config {config_name}, {raw_model.num_params() / 1e6:.2f}M params, vocab {cfg.vocab_size} "
        f"(tokenizer {tokenizer.vocab_size if tokenizer is not None else 'none: preset vocab'}), seq_len {seq_len}; device {device}, dtype "
        f"{str(ptdtype).replace('torch.', '')}{' + GradScaler' if use_scaler else ''}"
        f"{', compiled' if args.compile else ''}")
    log(f"batch: {args.batch_size} seq x {args.grad_accum} accum x {dist.world_size} procs = "
        f"{args.batch_size * args.grad_accum * dist.world_size} sequences, {tokens_per_step:,} tokens/step; "
        f"{args.stage} on {args.data}" + (f" ({n_train_tokens:,} train tokens)" if n_train_tokens else ""))

    metrics = MetricsLog(out / METRICS_NAME, master, step if ckpt is not None else None)
    run_config = {**{k: v for k, v in vars(args).items()}, "lr": lr, "seq_len": seq_len, "world_size": dist.world_size,
                  "model_config": cfg.to_dict(), "tokens_per_step": tokens_per_step}
    wandb_log = WandbLogger(args, args.wandb and master, run_config, out)
    train_args = {k: v for k, v in run_config.items() if isinstance(v, (str, int, float, bool, type(None)))}

    def gather_states():
        data_states = [sampler.state_dict()]
        rng_states = [get_rng_state()]
        if dist.enabled:
            import torch.distributed as tdist
            data_states = [None] * dist.world_size
            rng_states = [None] * dist.world_size
            tdist.all_gather_object(data_states, sampler.state_dict())
            tdist.all_gather_object(rng_states, get_rng_state())
        return ({"world_size": dist.world_size, "ranks": data_states},
                {"world_size": dist.world_size, "ranks": rng_states})

    def save(path: Path):
        # every rank takes part in the gather; only rank 0 writes
        data_state, rng_state = gather_states()
        if master:
            schedule.step = step
            fishai.save_checkpoint(str(path), raw_model, tokenizer=tokenizer, optimizer=optimizer,
                                   scheduler=schedule, scaler=scaler if use_scaler else None, step=step,
                                   best_val_loss=best_val, rng_state=rng_state, data_state=data_state,
                                   train_args=train_args, extra={"stage": args.stage, "tokens_seen": tokens_seen})

    def run_eval() -> float:
        if args.stage == "pretrain":
            return evaluate_pretrain(model, val_tokens, seq_len, args.batch_size, args.eval_iters, device,
                                     autocast_ctx, dist)
        return evaluate_sft(model, make_val_dataset, args.eval_iters, device, autocast_ctx, dist)

    hooks = FaultHooks()
    stop = _StopFlag()
    stop.install()
    from tqdm import tqdm
    bar = tqdm(total=args.max_steps, initial=step, desc=args.stage, unit="step", disable=not show_progress,
               dynamic_ncols=True, leave=True)
    say = (lambda msg: (tqdm.write(msg) if show_progress else print(msg, flush=True))) if master else (lambda m: None)
    nonfinite = 0
    last_val = None
    last_good = None
    interrupted = None
    stopped_by = None
    t_window, tok_window = time.time(), 0
    model.train()
    try:
        while step < args.max_steps:
            hooks.before_step(step, dist.rank)
            cur_lr = schedule.lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            loss_sum = torch.zeros((), device=device)
            tokens_this = 0
            for micro in range(args.grad_accum):
                sync = micro == args.grad_accum - 1
                ctx = model.no_sync() if (dist.enabled and not sync) else contextlib.nullcontext()
                with ctx:
                    if args.stage == "pretrain":
                        x, y = sampler.next_batch(device)
                        with autocast_ctx():
                            _, loss = model(x, y)
                        tokens_this += y.numel()
                    else:
                        x, y, mask, doc_ids = sampler.next_batch(device)
                        with autocast_ctx():
                            _, loss = model(x, y, loss_mask=mask, doc_ids=doc_ids)
                        tokens_this += y.numel()
                    loss = hooks.poison(loss, step)
                    loss = loss / args.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
            else:
                grad_norm = torch.zeros((), device=device)
            # one host sync per step: the (rank-averaged) loss decides whether the step is applied
            loss_val = _all_reduce_mean(loss_sum.item(), dist, device)
            gn = float(grad_norm)
            finite = math.isfinite(loss_val) and (use_scaler or math.isfinite(gn))
            if finite:
                scaler.step(optimizer)  # with fp16 the scaler itself skips steps with inf grads
                nonfinite = 0
            else:
                nonfinite += 1
                if use_scaler:
                    scaler.step(optimizer)  # skipped internally (inf/nan grads); lowers the scale
                say(f"warning: step {step}: non-finite loss ({loss_val}) / grad norm ({gn}); step skipped "
                    f"({nonfinite}/{args.max_nonfinite} in a row)")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            tok_window += tokens_this * dist.world_size
            bar.update(1)
            if nonfinite >= args.max_nonfinite:
                kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainError(f"loss was NaN/inf for {nonfinite} consecutive steps (up to step {step}); stopping, "
                                 f"{kept}. Lower --lr, raise --warmup or use --dtype bf16/fp32")

            if step % args.log_interval == 0 or step == args.max_steps:
                dt = max(time.time() - t_window, 1e-9)
                tps = tok_window / dt
                rec = {"step": step, "loss": loss_val, "lr": cur_lr, "grad_norm": gn, "tokens_per_sec": tps,
                       "tokens": tokens_seen, "time": time.time() - t_start}
                if peak_flops:
                    rec["mfu"] = fishai.estimate_mfu(tps, cfg, seq_len, peak_flops * dist.world_size)
                metrics.write(rec)
                wandb_log.log(rec, step)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{cur_lr:.2e}", tok_s=f"{tps:,.0f}")
                t_window, tok_window = time.time(), 0

            # stop requests (signal, --max-time) are agreed by all ranks before anything collective
            timed_out = args.max_time is not None and time.time() - t_start >= args.max_time
            flags = [1.0 if stop.signum is not None else 0.0, 1.0 if timed_out else 0.0]
            if dist.enabled:  # a rank that stops alone would leave the others hanging in all-reduce
                ft = torch.tensor(flags, device=device)
                _all_reduce_sum_tensor(ft, dist)
                flags = ft.tolist()
            stop_now, timed_out = flags[0] > 0, flags[1] > 0
            pause = args.stop_at is not None and step >= args.stop_at

            if step % args.eval_interval == 0 or step == args.max_steps or timed_out:
                last_val = run_eval()
                improved = math.isfinite(last_val) and (best_val is None or last_val < best_val)
                if improved:
                    best_val = last_val
                rec = {"step": step, "val_loss": last_val,
                       "val_ppl": math.exp(min(last_val, 50.0)) if math.isfinite(last_val) else float("nan"),
                       "best_val_loss": best_val}
                metrics.write(rec)
                wandb_log.log(rec, step)
                say(f"step {step}: train loss {loss_val:.4f}, val loss {last_val:.4f}, val ppl {rec['val_ppl']:.2f}"
                    + (" (best)" if improved else ""))
                if improved:
                    save(out / BEST_NAME)
                t_window = time.time()  # don't count eval time in tokens/s

            # during a NaN/inf streak keep the last good fishai-latest.pt (the streak may end the run)
            periodic = (step % args.save_interval == 0 or step == args.max_steps) and nonfinite == 0
            if periodic or stop_now or pause or timed_out:
                save(out / LATEST_NAME)
                last_good = out / LATEST_NAME
            if stop_now:
                interrupted = signal.Signals(stop.signum).name if stop.signum else "signal on another rank"
                say(f"{interrupted}: saved {out / LATEST_NAME} at step {step}; resume with --resume auto")
                break
            if pause:
                say(f"--stop-at {args.stop_at}: saved {out / LATEST_NAME} at step {step}; continue with --resume auto")
                break
            if timed_out and step < args.max_steps:
                stopped_by = "max_time"
                say(f"--max-time {args.max_time:g} s reached at step {step}/{args.max_steps}: saved "
                    f"{out / LATEST_NAME}; continue with --resume auto")
                break
    except torch.cuda.OutOfMemoryError:
        raise TrainError(f"CUDA out of memory with --batch-size {args.batch_size} --seq-len {seq_len}: lower "
                         f"--batch-size (raise --grad-accum to keep {args.batch_size * args.grad_accum} sequences "
                         f"per step) or lower --seq-len")
    finally:
        bar.close()
        stop.restore()
        metrics.close()

    elapsed = time.time() - t_start
    summary = {"steps": step, "tokens": tokens_seen, "best_val_loss": best_val,
               "last_val_loss": last_val, "elapsed_s": elapsed, "seq_len": seq_len, "lr": lr,
               "latest": str(out / LATEST_NAME), "best": str(out / BEST_NAME) if (out / BEST_NAME).exists() else None,
               "interrupted": interrupted, "stopped_by": stopped_by or ("signal" if interrupted else None),
               "world_size": dist.world_size, "tokens_per_step": tokens_per_step}
    if master:
        metrics_f = MetricsLog(out / METRICS_NAME, True, step)  # re-open in append mode
        metrics_f.write({"step": step, "event": "end", "elapsed_s": elapsed, "best_val_loss": best_val,
                         "interrupted": interrupted})
        metrics_f.close()
    wandb_log.finish({"final_checkpoint": summary["latest"], "best_checkpoint": summary["best"],
                      "best_val_loss": best_val})
    log(f"done: {step} steps, {summary['tokens']:,} tokens in {elapsed:.1f}s; best val loss "
        f"{best_val if best_val is None else round(best_val, 4)}; checkpoints in {out}")
    return summary


def _load_sampler_state_other_world(sampler, state: dict, dist: Dist) -> None:
    """A checkpoint from another world size: the samplers' state is (seed, batches drawn) and each
    rank's batches depend on its own rank, so rank 0's position is a valid position for every rank."""
    sampler.load_state_dict(state)


def _load_sft_conversations(args, data_utils, world_size: int = 1):
    """Read chat conversations; hold out every 20th one for validation unless --val-data is given
    (with fewer than 20 conversations the training set doubles as the validation set)."""
    convs = data_utils.read_sft_jsonl(args.data)
    if args.val_data:
        return convs, data_utils.read_sft_jsonl(args.val_data)
    train, val = _split_documents(convs)
    if len(val) < world_size:
        return convs, convs
    return train, val


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not faulthandler.is_enabled():
        # a worker that dies on a signal under torchrun shows only "exitcode -11"; this prints
        # the Python stack of every thread to that worker's stderr first
        faulthandler.enable()
    try:
        summary = train(args)
    except KeyboardInterrupt:  # a second Ctrl-C during a step
        print("interrupted", file=sys.stderr)
        return 130
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - known bad-input errors from the shared modules
        import model as fishai
        import data_utils
        if isinstance(e, (fishai.CheckpointError, data_utils.DataError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    if summary.get("interrupted") == "SIGINT":
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
