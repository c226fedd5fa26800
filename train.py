"""
Train a FishAI model: pretraining or chat SFT, on one CPU/GPU or many GPUs/nodes via torchrun.

Usage (copy-paste):

  # pretrain the seed's FishAI-Small on a prepared dataset (data_utils.py prepare -> data/) with
  # the preset's recipe (Muon + warmup-stable-decay, batch and LRs by RECIPE_RULE)
  python train.py --config small --data data/ --output-dir checkpoints --max-steps 10000 --device cuda

  # the 2022 baseline instead: AdamW + cosine, LR and batch of your choice
  python train.py --config small --data data/ --optimizer adamw --schedule cosine --lr 5e-4 \\
      --batch-size 4 --grad-accum 8 --warmup 100 --output-dir checkpoints-adamw

  # a WSD run is extended from the end of its stable phase: 10000 -> 20000 steps
  python train.py --resume checkpoints/fishai-stable.pt --max-steps 20000 --output-dir checkpoints

  # raw text (txt / jsonl / parquet / hf:NAME / python-docs) is tokenized on the fly
  python train.py --config tiny --data python-docs --tokenizer tokenizer/ --max-steps 300 --device cpu

  # continue an interrupted run exactly where it stopped: the paths are enough, every other
  # setting (batch, sequence length, LR, schedule, seed, data) comes from the checkpoint
  python train.py --config small --data data/ --output-dir checkpoints --resume auto
  python train.py --data data/ --resume checkpoints/fishai-latest.pt --output-dir checkpoints

  # several GPUs (or CPU processes with gloo); elastic restarts resume from fishai-latest.pt
  torchrun --nproc_per_node 8 --max-restarts 1 train.py --config small --data data/ --resume auto

  # chat SFT with assistant-only loss, starting from a pretrained checkpoint
  python train.py --stage sft --init-from checkpoints/fishai-best.pt --data chat.jsonl \\
      --output-dir checkpoints-sft --max-steps 500 --lr 1e-4

Outputs in --output-dir:
  fishai-latest.pt  everything needed to resume exactly (weights, optimizer, schedule, scaler, RNG
                    and data position, train args); every --save-interval steps, on Ctrl-C, at the end
  fishai-best.pt    the weights, config and tokenizer at the best validation loss (a complete model
                    for generate.py / quantize.py, without the optimizer state)
  fishai-stable.pt  --schedule wsd: the full state where the LR decay starts; extend the run with
                    --resume fishai-stable.pt --max-steps MORE (the decay moves to the new end)
  metrics.jsonl     one JSON object per log/eval/sample line
  loss_curve.png    train and val loss, written at the end of every run (needs matplotlib)
Checkpoints are written atomically, so a killed run always leaves a loadable fishai-latest.pt.
A run that fails before its first checkpoint removes the --output-dir it created.

Validation data: a prepared dir brings its val.bin; raw --data and SFT conversations without
--val-data hold out 5% of their documents by the project's one hold-out rule (data_utils.HOLDOUT_RULE,
also in --help), the rule that makes prepare's val.bin and quick_train's test documents too.

Resume: see RESUME_RULE below (also in --help): everything but the paths comes from the checkpoint.

Fault-injection hooks (environment variables, used by the tests; see README.md, "Train a model"):
FISHAI_FAULT_NAN_FROM_STEP, FISHAI_FAULT_OOM_AT_STEP, FISHAI_FAULT_EXIT_AT_STEP (+
FISHAI_FAULT_EXIT_RANK, FISHAI_FAULT_MARKER).
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import common
import data_utils
import engine
from engine import fit_prompt, generate_samples
from model import (GPT, IGNORE_INDEX, CheckpointError, ModelConfig, device_peak_flops, estimate_mfu, get_config,
                   load_checkpoint, load_model, load_state_checked, save_checkpoint)
from optim import CosineSchedule, WSDSchedule, build_optimizer, build_schedule, set_lrs
import readers
import text_tokenizer
import token_data

LATEST_NAME = "fishai-latest.pt"
BEST_NAME = "fishai-best.pt"
METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"
WANDB_NAME = "wandb"  # wandb's own run folder, when --wandb logs
VOCAB_MULTIPLE = 64  # pad the embedding to a multiple of 64 so the vocab matmul uses fast kernels
VAL_FRACTION = 0.05  # raw --data without --val-data: share of documents held out (du.holdout_split)
STABLE_NAME = "fishai-stable.pt"
# what a run writes into --output-dir, and the kind each must be (--overwrite replaces these, nothing else)
RUN_FILES = {LATEST_NAME: "checkpoint", BEST_NAME: "checkpoint", STABLE_NAME: "checkpoint", METRICS_NAME: None,
             LOSS_CURVE_NAME: "png", WANDB_NAME: None}
STAGES = ("pretrain", "sft")
OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("wsd", "cosine")

HOLDOUT_RULE = (
    "Validation data: a prepared dir brings its own val.bin; for raw --data (and SFT conversations) without "
    "--val-data, 5% of the documents are held out (val_fraction 0.05). The tokenizer may have seen validation "
    "documents, never quick_train's test documents. " + data_utils.HOLDOUT_RULE)

RESUME_RULE = (
    "Resume (--resume): the run continues exactly. Optimizer, batch, accumulation, sequence length, LRs, "
    "schedule, warmup, max steps, seed, data, intervals, device and dtype come from the checkpoint's "
    "train args, so the paths are enough. A flag given again with another value is applied and printed "
    "('changed on resume: lr 0.002 -> 0.001') when that is safe: --lr --embed-lr --norm-lr "
    "--min-lr-ratio --warmup --max-steps --schedule --decay-frac --grad-clip --max-nonfinite, the "
    "eval/save/log/sample intervals, --eval-iters, --max-new-tokens, --device --dtype --compile and the "
    "wandb flags. A WSD run is extended by resuming its fishai-stable.pt (saved where the decay starts) "
    "with a larger --max-steps. A flag is refused, with the reason, where it would break the exact "
    "continuation: --optimizer --batch-size --grad-accum --seq-len --seed --data --val-data --text-key "
    "--max-data-tokens --stage --init-from --weight-decay --beta1 --beta2 --muon-momentum and "
    "the model config (--config, --model-override); a new --data is taken only when the saved path no "
    "longer exists from here (moved data). --output-dir, --max-time, --stop-at and --quiet "
    "belong to each command.")

# The recipe: what a run uses for each optimisation flag it was not given. Measured on `tiny`
# (python benchmark.py recipe, docs/RESULTS.md); the other presets follow the same rule by width.
RECIPE_LR = {"muon": 8e-3, "adamw": 1.4e-3}  # peak LR of the matmul weights at d_model 256 (measured: RESULTS.md)
RECIPE_EMBED_LR_RATIO = 1.0  # muon: the embedding/head's AdamW LR = ratio * the Muon LR
RECIPE_WARMUP_FRAC = 0.02  # warmup steps = 2% of --max-steps
RECIPE_SFT_LR_SCALE = 0.2  # SFT starts from a trained model: a fifth of the pretraining LR
RECIPE_DECAY_FRAC = 0.2  # wsd: the last 20% of the steps decay the LR
GPU_ACTIVATION_SHARE = 0.4  # a GPU micro-batch's activations may take this share of the GPU's memory
RECIPE_RULE = (
    f"Recipe (the default of every optimisation flag not given): --optimizer muon --schedule wsd; LR of "
    f"the matmul weights = {RECIPE_LR['muon']:g} x sqrt(256 / d_model) with Muon ({RECIPE_LR['adamw']:g} x "
    f"sqrt(256 / d_model) with --optimizer adamw); embedding LR = {RECIPE_EMBED_LR_RATIO:g} x that, norm LR = "
    f"that; x {RECIPE_SFT_LR_SCALE:g} for --stage sft; --warmup = {RECIPE_WARMUP_FRAC:.0%} of --max-steps; "
    f"sequences per step = 16 x d_model / 256 (tiny 16, small 32, medium 64, large 128), micro-batch "
    f"16 x 256 / d_model (at least 1) and --grad-accum the rest - on a GPU the whole step in one micro-batch "
    f"when its activations fit in {GPU_ACTIVATION_SHARE:.0%} of the GPU's memory (else halved until they do); "
    f"--grad-clip 1.0. --micro-tokens N sets the micro-batch to N / --seq-len sequences and --grad-accum to "
    f"what keeps the step's sequences; a micro-batch bigger than the step makes the step that micro-batch and "
    f"scales every LR by sqrt(new step / recipe step) (the square-root rule for Adam-type updates; not yet "
    f"measured against the recipe). The tiny values are "
    f"measured (python benchmark.py recipe); the larger presets follow the rule. A flag given wins.")

# On --resume a flag given again with a new value is applied when it only changes what happens
# from now on (the schedule's shape, the intervals, the hardware) ...
RESUME_SAFE = ("lr", "embed_lr", "norm_lr", "min_lr_ratio", "warmup", "max_steps", "schedule", "decay_frac",
               "grad_clip", "max_nonfinite", "eval_interval",
               "eval_iters", "save_interval", "log_interval", "sample_interval", "max_new_tokens", "device",
               "dtype", "compile", "compile_optimizer", "wandb", "wandb_project", "wandb_run_name")
# ... and refused where the saved state would no longer describe the run (flag -> why).
RESUME_LOCKED = {
    "optimizer": "the saved optimizer state is that optimizer's",
    "batch_size": "it sets the sequences of every step, and the data position counts batches",
    "grad_accum": "it sets the sequences of every step, and the data position counts batches",
    "micro_tokens": "it sets the sequences of every step, and the data position counts batches",
    "seq_len": "the saved data position and the batches are made of windows of this length",
    "seed": "the data order and every RNG stream follow it",
    "data": "the saved data position is a position in that data",
    "val_data": "the best val loss so far was measured on it",
    "text_key": "the saved data position is a position in that data",
    "txt_mode": "the saved data position is a position in that data",
    "max_data_tokens": "the saved data position is a position in that data",
    "stage": "the loss and the data format follow it",
    "init_from": "the run's weights started from that checkpoint",
    "weight_decay": "the saved optimizer state carries it",
    "beta1": "the saved optimizer state carries it",
    "beta2": "the saved optimizer state carries it",
    "muon_momentum": "the saved optimizer state carries it",
}
# Taken from each command line, never from the checkpoint (--stop-at 3 must not stop the next run at 3).
PER_COMMAND = ("output_dir", "resume", "overwrite", "quiet", "max_time", "stop_at", "tokenizer", "config",
               "model_override")


class TrainError(common.FishAIError):
    """A bad flag or input; main() prints it as one line and exits with EXIT_USAGE (2)."""


class TrainFailed(TrainError, common.RunFailed):
    """The run started but could not go on (CUDA out of memory, divergence): exit EXIT_FAILED (1)."""


class DivergedError(TrainFailed):
    """The loss stayed NaN/inf for --max-nonfinite steps in a row; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- arguments

def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(
        prog="train.py", description="\n\n".join(textwrap.fill(t, 100, break_on_hyphens=False) for t in (
            "Pretrain or SFT a FishAI (LLaMA-style) model. Single process or torchrun (DDP).", RECIPE_RULE,
            HOLDOUT_RULE, RESUME_RULE)))
    _add_model_flags(p.add_argument_group("model and data"))
    _add_optim_flags(p.add_argument_group("optimisation (with --resume: the checkpoint's, see above)"))
    _add_output_flags(p.add_argument_group("evaluation, samples, checkpoints and logging"))
    g = p.add_argument_group("hardware")
    common.add_device_flag(g)
    common.add_dtype_flag(g, "auto: bf16 on CUDA if supported else fp16 (+GradScaler); fp32 on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA, off elsewhere, where compiling costs more "
                        "than it saves for these sizes)")
    g.add_argument("--compile-optimizer", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile Muon's and its AdamW groups' update math once (fullgraph; the LR and "
                        "momentum as 0-D tensors, so no recompile); off until a GPU check shows it faster")
    return p


def _add_model_flags(g) -> None:
    g.add_argument("--config", default=None,
                   help="model preset from model.py: tiny, small, medium, large (default small; with --resume "
                        "the checkpoint's config, checked against --config when given)")
    g.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one field of the preset (repeatable), e.g. --model-override d_model=128 "
                        "--model-override n_layers=2; fields: vocab_size d_model n_layers n_heads n_kv_heads "
                        "d_ff max_seq_len rope_theta norm_eps init_std (by default none)")
    g.add_argument("--stage", choices=STAGES, default="pretrain",
                   help="pretrain: next-token loss on all tokens; sft: chat data, loss on assistant tokens only")
    g.add_argument("--data", default=None,
                   help="prepared dir (train.bin/val.bin/meta.json from data_utils.py prepare; default ./data "
                        "when it holds one), or raw text tokenized on the fly: .txt/.jsonl/.parquet file, dir, "
                        "glob, hf:NAME[:CONFIG[:SPLIT]] or python-docs. For --stage sft: a chat .jsonl")
    g.add_argument("--val-data", default=None,
                   help="raw validation text/chat file; without it 5%% of the --data documents are held out "
                        "(the hold-out rule, above)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer dir (tokenizer_train.py) for raw --data; a prepared dir's own tokenizer/ "
                        "is used when omitted; with --init-from/--resume the checkpoint's tokenizer is used")
    readers.add_text_format_flags(g)
    g.add_argument("--max-data-tokens", type=common.size_flag, default=None, metavar="N",
                   help="stop tokenizing raw --data after about this many tokens, e.g. 50M (bounds HF streams)")
    g.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (fresh optimizer/schedule); required for sft")


def _add_optim_flags(g) -> None:
    recipe = "default: the model's recipe, see RECIPE_RULE"
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"muon: Muon for the hidden matrices + AdamW for the embedding and norms; adamw: AdamW "
                        f"for everything ({recipe})")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help=f"wsd: warmup, constant, linear decay over the last --decay-frac of the steps "
                        f"(extendable from fishai-stable.pt); cosine: warmup, cosine decay ({recipe})")
    g.add_argument("--decay-frac", type=common.float_flag(0, 1, lo_open=True), default=RECIPE_DECAY_FRAC,
                   help="wsd: share of --max-steps spent decaying the LR")
    g.add_argument("--batch-size", type=common.int_flag(1), default=None,
                   help=f"sequences per micro-batch per process ({recipe})")
    g.add_argument("--grad-accum", type=common.int_flag(1), default=None,
                   help=f"micro-batches accumulated per optimizer step ({recipe})")
    g.add_argument("--micro-tokens", type=common.size_flag, default=None, metavar="N",
                   help="tokens per micro-batch (e.g. 64K on a big GPU): sets --batch-size and --grad-accum "
                        "by the recipe's rule (RECIPE_RULE above); not with --batch-size/--grad-accum")
    g.add_argument("--seq-len", type=common.int_flag(2), default=None,
                   help="tokens per sequence (default: min(512, the model's max_seq_len))")
    g.add_argument("--lr", type=common.float_flag(0, lo_open=True), default=None,
                   help=f"peak learning rate of the matmul weights (Muon or AdamW; {recipe})")
    g.add_argument("--embed-lr", type=common.float_flag(0, lo_open=True), default=None,
                   help=f"muon: AdamW peak LR of the tied embedding/head ({recipe})")
    g.add_argument("--norm-lr", type=common.float_flag(0, lo_open=True), default=None,
                   help=f"muon: AdamW peak LR of the RMSNorm weights ({recipe})")
    g.add_argument("--min-lr-ratio", type=common.float_flag(0, 1), default=0.1,
                   help="the decay ends at min_lr_ratio * lr")
    g.add_argument("--warmup", type=common.int_flag(0), default=None,
                   help=f"linear warmup steps ({recipe})")
    g.add_argument("--max-steps", type=common.int_flag(1), default=10000,
                   help="optimizer steps in total (incl. resumed ones)")
    g.add_argument("--weight-decay", type=common.float_flag(0), default=0.1,
                   help="decoupled weight decay of the 2-D matmul weights (never the embedding or norms)")
    g.add_argument("--beta1", type=common.float_flag(0, 1, hi_open=True), default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=common.float_flag(0, 1, hi_open=True), default=0.95, help="AdamW beta2")
    g.add_argument("--muon-momentum", type=common.float_flag(0, 1, hi_open=True), default=0.95,
                   help="muon: Nesterov momentum (warmed up from 0.85 over the first 300 steps)")
    g.add_argument("--grad-clip", type=common.float_flag(0), default=None,
                   help=f"clip the global grad norm, 0 = off ({recipe})")
    g.add_argument("--stop-at", type=common.int_flag(1), default=None, metavar="STEP",
                   help="save fishai-latest.pt and exit once this step is reached, keeping the schedule of "
                        "--max-steps (time-sliced/preemptible jobs; continue later with --resume)")
    g.add_argument("--max-time", type=common.float_flag(0), default=None, metavar="SECONDS",
                   help="evaluate, save fishai-latest.pt and stop after this much wall time (cluster time "
                        "limits, time-boxed runs); continue later with --resume")
    g.add_argument("--max-nonfinite", type=common.int_flag(1), default=10,
                   help="stop after this many consecutive steps with a NaN/inf loss")
    g.add_argument("--seed", type=common.int_flag(0), default=1337, help="seed of the data order and the weights")


def _add_output_flags(g) -> None:
    g.add_argument("--output-dir", default="checkpoints", help="where checkpoints and metrics.jsonl go")
    g.add_argument("--eval-interval", type=common.int_flag(1), default=250, help="evaluate on the val split every N steps")
    g.add_argument("--eval-iters", type=common.int_flag(1), default=50, help="val batches per evaluation")
    g.add_argument("--save-interval", type=common.int_flag(1), default=250, help="write fishai-latest.pt every N steps")
    g.add_argument("--log-interval", type=common.int_flag(1), default=10, help="write a metrics line every N steps")
    g.add_argument("--sample-interval", type=common.int_flag(0), default=1000, metavar="N",
                   help="print a text sample every N steps, 0 = off (default 1000: one sample costs about "
                        "one eval batch, so it adds <0.1%% to a run and a 10,000-step run shows ten)")
    g.add_argument("--max-new-tokens", type=common.int_flag(1), default=64, help="tokens per text sample")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="resume from a checkpoint; 'auto' (or no value) = <output-dir>/fishai-latest.pt "
                        "if it exists, else start fresh")
    common.add_overwrite_flag(g, "the checkpoints of an earlier run in --output-dir (start a fresh run there)")
    g.add_argument("--wandb", action="store_true", help="log config, metrics and the final checkpoint to wandb")
    g.add_argument("--wandb-project", default="fishai-train", help="wandb project")
    g.add_argument("--wandb-run-name", default=None, help="wandb run name (default: wandb picks one)")
    common.add_quiet_flag(g)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse train.py's command line. args._given holds the flags the user typed (a second parse
    with every default suppressed), so --resume can tell 'not given' from 'given the default'."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # (set_defaults would put the SUPPRESS marker into the namespace)
        action.default = argparse.SUPPRESS
    args._given = frozenset(vars(parser.parse_args(argv)))
    if "micro_tokens" in args._given and args._given & {"batch_size", "grad_accum"}:
        parser.error("--micro-tokens sets --batch-size and --grad-accum: give one or the others")
    return args


def make_args(**kw) -> argparse.Namespace:
    """train.py's arguments for library use (quick_train): the parser's defaults with kw (dest
    names, e.g. batch_size=8) applied. Each value is checked by its flag's own type and choices,
    as on the command line (TrainError naming the flag otherwise); None keeps the default."""
    parser = build_parser()
    args = parser.parse_args([])
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    given = set()
    for key, value in kw.items():
        if key not in actions:
            raise TypeError(f"make_args: train.py has no argument {key!r}")
        if value is not None:
            setattr(args, key, _checked_value(actions[key], value))
            given.add(key)
    args._given = frozenset(given)
    return args


def _checked_value(action: argparse.Action, value):
    flag = action.option_strings[0]
    if isinstance(action, argparse._AppendAction):
        return [_checked_value(argparse.Action([flag], action.dest, type=action.type), v) for v in value]
    if action.nargs == 0:  # store_true
        return bool(value)
    if isinstance(value, os.PathLike):
        value = str(value)
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise TrainError(f"{flag} {value}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise TrainError(f"{flag} {value}: choose one of {', '.join(map(str, action.choices))}")
    return value


def given_flags(args: argparse.Namespace) -> frozenset:
    """The dests set explicitly (parse_args/make_args record them); for a hand-made Namespace,
    the ones that differ from the parser's defaults."""
    given = getattr(args, "_given", None)
    if given is not None:
        return given
    defaults = vars(build_parser().parse_args([]))
    return frozenset(k for k, v in vars(args).items() if k in defaults and v != defaults[k])


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


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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
            raise TrainError(f"--model-override {item!r}: {value!r} is not a number") from None
    return out


def default_seq_len(cfg: ModelConfig) -> int:
    """--seq-len when not given: the model's context, capped at 512 (longer windows cost more per
    token than they teach a small model early on)."""
    return min(512, cfg.max_seq_len)


def build_config(name: str, vocab_size: int | None, overrides: dict) -> ModelConfig:
    """Preset + overrides; the vocab comes from the tokenizer (rounded up) unless overridden."""
    kw = dict(overrides)
    if vocab_size is not None and "vocab_size" not in kw:
        kw["vocab_size"] = vocab_size
    try:
        return get_config(name, **kw)
    except (TypeError, ValueError) as e:
        raise TrainError(f"--config {name}: {e}") from None


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return ((int(n) + multiple - 1) // multiple) * multiple


# ----------------------------------------------------------------------------- distributed

@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str | None = None) -> Distributed:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
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
    return Distributed(rank=tdist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                world_size=tdist.get_world_size())


def setup_device(name: str, dist: Distributed) -> torch.device:
    """The run's device (a torchrun worker: its local rank's GPU), made the current CUDA device so
    that kernels, NCCL and the memory counters all use it. resolve_device always returns an indexed
    CUDA device: torch.cuda.set_device refuses a bare "cuda"."""
    device = common.resolve_device(name, dist.local_rank if dist.enabled else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # fp32 matmuls (outside bf16 autocast) on TF32 tensor cores, as nanoGPT does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def _all_reduce_mean(value: float, dist: Distributed, device: torch.device) -> float:
    if not dist.enabled:
        return value
    import torch.distributed as tdist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.item() / dist.world_size


def _all_reduce_sum_tensor(t: torch.Tensor, dist: Distributed) -> torch.Tensor:
    if dist.enabled:
        import torch.distributed as tdist
        tdist.all_reduce(t)
    return t


def _all_gather(obj, dist: Distributed) -> list:
    if not dist.enabled:
        return [obj]
    import torch.distributed as tdist
    out = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


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


# ----------------------------------------------------------------------------- where a run starts

@dataclass
class RunStart:
    """Where a run starts: its effective args (on resume: the checkpoint's, see RESUME_RULE), the
    checkpoint it resumes (everything) or is initialised from (weights), each read once, the
    tokenizer and the model config."""
    args: argparse.Namespace
    resume_path: Path | None
    ckpt: dict | None
    init: dict | None
    tokenizer: text_tokenizer.TextTokenizer | None
    cfg: ModelConfig
    config_name: str


def resolve_start(args: argparse.Namespace, dist: Distributed, log) -> RunStart:
    out = Path(args.output_dir)
    resume_path = find_resume_checkpoint(args, out, dist, log)
    ckpt = load_resume_checkpoint(resume_path) if resume_path else None
    args = resumed_args(args, ckpt, resume_path, log) if ckpt else argparse.Namespace(**vars(args))
    _default_data(args, log)
    if args.stage == "sft" and not args.init_from and ckpt is None:
        raise TrainError("--stage sft needs --init-from CHECKPOINT (a pretrained model and its tokenizer)")
    init = None
    if ckpt is None and args.init_from:
        init = load_init_weights(args.init_from, log)
    source = ckpt or init
    tokenizer = resolve_tokenizer(args, source, resume_path or args.init_from)
    cfg, config_name = resolve_config(args, ckpt, init, tokenizer, resume_path)
    if args.seq_len is None:
        args.seq_len = default_seq_len(cfg)
    if not 2 <= args.seq_len <= cfg.max_seq_len:
        raise TrainError(f"--seq-len {args.seq_len} must be between 2 and the model's max_seq_len "
                         f"{cfg.max_seq_len} (config {config_name})")
    apply_recipe(args, cfg, legacy=ckpt is not None and "optimizer" not in (ckpt.get("train_args") or {}),
                 gpu_bytes=gpu_memory_bytes(args.device, dist.local_rank if dist.enabled else None))
    return RunStart(args=args, resume_path=resume_path, ckpt=ckpt, init=init, tokenizer=tokenizer, cfg=cfg,
                    config_name=config_name)


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """What one token of a bf16 training micro-batch keeps for the backward pass, roughly: per layer
    the fp32 residual inputs, the normed inputs, q/k/v and the attention output (flash attention
    keeps no T x T matrix), the four d_ff-wide MLP tensors; then ~12 bytes per logit (bf16 logits,
    their fp32 copy and both gradients)."""
    return cfg.n_layers * 2 * (12 * cfg.d_model + 4 * cfg.d_ff) + 12 * cfg.vocab_size


def recipe_for(cfg: ModelConfig, optimizer: str = "muon", stage: str = "pretrain",
               gpu_bytes: int | None = None, seq_len: int | None = None) -> dict:
    """The optimisation settings of RECIPE_RULE for a model of this width. gpu_bytes (the GPU's
    memory; None on a CPU) sets the micro-batch: the whole step when its activations fit."""
    width = cfg.d_model / 256
    lr = RECIPE_LR[optimizer] / math.sqrt(width) * (RECIPE_SFT_LR_SCALE if stage == "sft" else 1.0)
    seqs = max(1, round(16 * width))
    micro = max(1, min(seqs, round(16 / width)))
    if gpu_bytes:  # a GPU wants big matmuls: as many sequences at once as fit, same tokens per step
        micro, per_seq = seqs, activation_bytes_per_token(cfg) * (seq_len or default_seq_len(cfg))
        while micro % 2 == 0 and micro * per_seq > GPU_ACTIVATION_SHARE * gpu_bytes:
            micro //= 2
    return {"optimizer": optimizer, "schedule": "wsd", "lr": lr, "embed_lr": lr * RECIPE_EMBED_LR_RATIO,
            "norm_lr": lr, "batch_size": micro, "grad_accum": max(1, seqs // micro), "grad_clip": 1.0}


def gpu_memory_bytes(device_name, local_rank: int | None = None) -> int | None:
    """Total memory of the GPU a --device names (None for a CPU or MPS)."""
    if not torch.cuda.is_available():
        return None
    device = common.resolve_device(device_name, local_rank)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def apply_recipe(args, cfg: ModelConfig, legacy: bool = False, gpu_bytes: int | None = None) -> None:
    """Fill every optimisation flag left at None from the model's recipe. A checkpoint from before
    the recipe existed (no 'optimizer' in its train args) ran AdamW + cosine, and resumes so."""
    if legacy:
        args.optimizer = args.optimizer or "adamw"
        args.schedule = args.schedule or "cosine"
        for key, old_default in (("batch_size", 4), ("grad_accum", 8), ("warmup", 100), ("grad_clip", 1.0)):
            if getattr(args, key) is None:
                setattr(args, key, old_default)
    recipe = recipe_for(cfg, args.optimizer or "muon", args.stage, gpu_bytes, args.seq_len)
    if getattr(args, "micro_tokens", None) and args.batch_size is None and args.grad_accum is None:
        micro_batch(args, recipe)  # (on --resume the checkpoint's batch and accumulation stand)
    if args.lr is not None:  # the embedding and norm LRs follow a given --lr
        recipe.update(embed_lr=args.lr * RECIPE_EMBED_LR_RATIO, norm_lr=args.lr)
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = math.ceil(RECIPE_WARMUP_FRAC * args.max_steps)


def micro_batch(args, recipe: dict) -> None:
    """--micro-tokens (RECIPE_RULE): the recipe's micro-batch and accumulation for N tokens per
    micro-batch, the step's sequences kept; a bigger micro-batch is the step, with every LR scaled by
    the square root of how much the step grew."""
    micro = max(1, args.micro_tokens // args.seq_len)
    seqs = recipe["batch_size"] * recipe["grad_accum"]
    accum = max(1, math.ceil(seqs / micro))
    grow = micro * accum / seqs
    recipe.update(batch_size=micro, grad_accum=accum)
    if grow > 1:
        recipe.update({k: recipe[k] * math.sqrt(grow) for k in ("lr", "embed_lr", "norm_lr")})


def output_plan(args) -> tuple[list, list]:
    """What a run writes (--output-dir: RUN_FILES, never anything else there) and reads. A folder
    holding another run is refused unless this run continues it (--resume) or --overwrite says to
    start over there; the checkpoint a run resumes from may lie in it, any other input may not."""
    out = Path(args.output_dir)
    latest, resume = out / LATEST_NAME, args.resume
    own_resume = resume not in (None, "auto") and Path(resume).resolve().parent == out.resolve()
    continues = (resume == "auto" and latest.exists()) or own_resume
    inputs = [("--data", args.data or ("data" if args.stage == "pretrain" else None)), ("--val-data", args.val_data),
              ("--tokenizer", args.tokenizer), ("--init-from", args.init_from)]
    if resume not in (None, "auto") and not own_resume:
        inputs.append(("--resume", resume))
    return ([common.Output(out, "--output-dir", "run", owns=RUN_FILES, continues=continues,
                           resume="--resume auto to continue it" if latest.exists() else None)], inputs)


def find_resume_checkpoint(args, out: Path, dist: Distributed, log) -> Path | None:
    if args.resume is None:  # a run already in --output-dir was refused by output_plan
        return None
    path = out / LATEST_NAME if args.resume == "auto" else Path(args.resume)
    if args.resume == "auto" and not path.exists():
        log(f"--resume auto: no {path} yet, starting a fresh run")
        return None
    if not path.exists():
        raise TrainError(f"--resume {path}: no such checkpoint")
    return path


def load_init_weights(path: str, log) -> dict:
    """--init-from: the weights (config, state, tokenizer, stage) of any model file load_model reads:
    a .pt checkpoint as it is; a quantized .bin dequantized to float weights, and an HF Llama
    directory converted (each with a note: training continues from those weights)."""
    p = Path(path)
    if common.check_model_path(p, "--init-from") == "checkpoint":  # a GGUF, a token file...: what it is instead
        return load_checkpoint(path)
    gpt = load_model(p, dequantize=True)
    log(f"note: --init-from {path}: " + ("a quantized export, dequantized to float weights (its rounding stays in "
                                         "them)" if p.is_file() else "an HF Llama directory, converted") +
        "; training starts from there with a fresh optimizer")
    return {"config": gpt.config.to_dict(), "model": {k: v.detach().float() for k, v in gpt.state_dict().items()},
            "tokenizer": gpt.tokenizer.to_dict() if gpt.tokenizer is not None else None}


def load_resume_checkpoint(path: Path) -> dict:
    """Read the checkpoint to resume; when it is unreadable, the error names fishai-best.pt (beside
    it) as the way out: a new run from the best weights."""
    if path.is_dir() or common.file_kind(path) == "quantized":
        kind = "an HF model directory" if path.is_dir() else "a quantized export (quantize.py)"
        raise TrainError(f"--resume {path}: {kind} holds weights only (no optimizer, schedule or data position), "
                         f"so no run can continue from it; start a new run from its weights with --init-from "
                         f"{path} --output-dir NEW_DIR")
    try:
        ckpt = load_checkpoint(str(path))
    except CheckpointError as e:
        best = path.parent / BEST_NAME
        way_out = (f"{best} holds the best weights: start a new run from them with --init-from {best} "
                   "--output-dir NEW_DIR (a new directory keeps them safe)"
                   if best.exists() else f"no {BEST_NAME} was found beside it either: start a new run with --overwrite")
        raise TrainError(f"{common.one_line(e)}; {way_out}") from None
    if ckpt.get("optimizer") is None:
        raise TrainError(f"--resume {path}: it holds weights only ({BEST_NAME} files keep no optimizer, schedule "
                         f"or data position), so the run cannot continue exactly; start a new run from these "
                         f"weights with --init-from {path}")
    return ckpt


def same_setting(key: str, old, new) -> bool:
    if old == new:
        return True
    if key in ("data", "val_data", "init_from") and old and new:
        return os.path.realpath(str(old)) == os.path.realpath(str(new))
    return False


def data_moved(key: str, old) -> bool:
    """A saved data path that does not exist from here (moved, or another working directory): the
    path given now is the only way to name the data, so it is taken (and printed)."""
    return (key in ("data", "val_data") and bool(old) and not str(old).startswith("hf:")
            and str(old) != "python-docs" and not os.path.exists(str(old)))


def format_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def resumed_args(args: argparse.Namespace, ckpt: dict, path: Path, log) -> argparse.Namespace:
    """The run's settings on --resume: the checkpoint's train args, with each flag given on this
    command line applied when that keeps the continuation exact (RESUME_SAFE, printed) and refused
    with the reason otherwise (RESUME_LOCKED). See RESUME_RULE."""
    saved = ckpt.get("train_args") or {}
    merged = argparse.Namespace(**vars(args))
    if not saved:
        log(f"note: {path} has no saved train args (an older checkpoint); this command line's flags are used")
        return merged
    given = given_flags(args)
    for key, old in saved.items():
        if key not in vars(args) or key in PER_COMMAND or key.startswith("_"):
            continue
        new = getattr(args, key)
        if key not in given or same_setting(key, old, new):
            setattr(merged, key, old)
        elif key in RESUME_LOCKED and not data_moved(key, old):
            flag = "--" + key.replace("_", "-")
            raise TrainError(f"--resume {path}: {flag} {format_value(new)} differs from the checkpoint's {format_value(old)} and "
                             f"would break the exact continuation ({RESUME_LOCKED[key]}); drop {flag}, or start a "
                             f"new run from these weights with --init-from {path} --output-dir NEW_DIR")
        else:
            log(f"changed on resume: {key.replace('_', '-')} {format_value(old)} -> {format_value(new)}")
    step = int(ckpt.get("step", 0))
    if merged.max_steps < step:
        raise TrainError(f"--resume {path}: the checkpoint is at step {step} already; give --max-steps >= {step}")
    note = lr_jump_note(saved, merged, step, path)
    if note:
        log(note)
    return merged


SCHEDULE_KEYS = ("lr", "warmup", "max_steps", "schedule", "decay_frac", "min_lr_ratio")


def lr_jump_note(saved: dict, merged: argparse.Namespace, step: int, path: Path) -> str | None:
    """A line when the resumed schedule moves the LR at the step the run continues from: the last
    step's LR under the saved settings against the next step's under the new ones (a finished WSD
    run resumed with a larger --max-steps jumps back up: its decay restarts later)."""
    if step == 0 or any(saved.get(k) is None for k in SCHEDULE_KEYS) or \
            all(saved[k] == getattr(merged, k) for k in SCHEDULE_KEYS):
        return None
    before = build_schedule(argparse.Namespace(**{k: saved[k] for k in SCHEDULE_KEYS})).lr_at(step - 1)
    after = build_schedule(merged).lr_at(step)
    if abs(after - before) <= 0.05 * max(before, 1e-12):
        return None
    note = f"changed on resume: the LR at step {step} goes from {before:.3g} (the last step's) to {after:.3g}"
    stable = path.parent / STABLE_NAME
    if saved.get("schedule") == "wsd" and after > before and path.name != STABLE_NAME:
        note += (f"; a WSD run is extended without a jump from {stable} (--resume {stable} --max-steps "
                 f"{merged.max_steps}): its decay then starts over from the stable LR" if stable.exists() else
                 "; a WSD run is extended without a jump from its fishai-stable.pt")
    return note


def _default_data(args, log) -> None:
    if args.data is not None:
        return
    # the seed's command has no --data: use what `data_utils.py prepare --output data/` wrote
    if args.stage == "pretrain" and (Path("data") / "train.bin").is_file():
        args.data = "data"
        log("--data not given: using the prepared dataset in ./data")
        return
    raise TrainError("--data not given and ./data has no train.bin: run `python data_utils.py prepare "
                     "--input ... --tokenizer tokenizer/ --output data/` first, or pass --data (a prepared "
                     "dir, a text/jsonl/parquet file, hf:NAME or python-docs)")


def is_prepared_dir(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.exists(os.path.join(path, "train.bin"))


def resolve_tokenizer(args, source: dict | None, source_name) -> text_tokenizer.TextTokenizer | None:
    """The checkpoint's embedded tokenizer > --tokenizer > a prepared dir's own tokenizer/."""
    if source is not None and source.get("tokenizer"):
        try:
            tok = text_tokenizer.TextTokenizer.from_dict(source["tokenizer"])
        except Exception as e:  # noqa: BLE001 - reported as one line
            raise TrainError(f"{source_name}: embedded tokenizer cannot be loaded ({e})") from None
        if args.tokenizer and text_tokenizer.load_tokenizer(args.tokenizer).hash != tok.hash:
            raise TrainError(f"--tokenizer {args.tokenizer} differs from the one in checkpoint {source_name}; "
                             "drop --tokenizer (the checkpoint's is used)")
        return tok
    if args.tokenizer:
        return text_tokenizer.load_tokenizer(args.tokenizer)
    if is_prepared_dir(args.data) and (Path(args.data) / "tokenizer" / "tokenizer.json").exists():
        return text_tokenizer.load_tokenizer(Path(args.data) / "tokenizer")
    if not is_prepared_dir(args.data):
        raise TrainError(f"--data {args.data}: raw text needs a tokenizer; pass --tokenizer DIR (train one with "
                         "tokenizer_train.py) or prepare the data with data_utils.py")
    return None  # a prepared dir without its tokenizer/: the preset's vocab


def _config_diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}={a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def resolve_config(args, ckpt, init, tokenizer, resume_path) -> tuple[ModelConfig, str]:
    """The model config: the checkpoint's (a resumed one is checked against --config and
    --model-override when given), else the preset + overrides with the tokenizer's vocab rounded up."""
    overrides = parse_overrides(args.model_override)
    name = args.config or "small"
    vocab = round_up(tokenizer.vocab_size) if tokenizer is not None else None  # None: the preset's vocab
    wanted = build_config(name, vocab, overrides)  # also fails fast on an unknown preset/field
    source = ckpt or init
    if source is None:
        cfg = wanted
    else:
        try:
            cfg = ModelConfig.from_dict(dict(source["config"]))
        except (TypeError, ValueError) as e:
            raise TrainError(f"{resume_path or args.init_from}: bad model config in checkpoint ({e})") from None
        diff = _config_diff(cfg.to_dict(), wanted.to_dict())
        if ckpt is not None and (args.config is not None or overrides) and diff:
            against = f"--config {name}" + (" with --model-override" if overrides else "")
            raise TrainError(f"--resume {resume_path}: the checkpoint's model config differs from {against} "
                             f"({'; '.join(diff[:4])}); use the same --config or a new --output-dir")
        name = (args.config or "from checkpoint") if ckpt is not None else f"from {args.init_from}"
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise TrainError(f"tokenizer vocab {tokenizer.vocab_size} > model vocab {cfg.vocab_size}; "
                         "the model must be built for this tokenizer")
    return cfg, name


# ----------------------------------------------------------------------------- data

BATCH_KEYS = ("idx", "targets", "loss_mask", "doc_ids")


def as_batch(tensors) -> dict:
    """(x, y) of TokenWindowSampler or (x, y, loss_mask, doc_ids) of SFTDataset -> GPT.forward's
    keyword arguments, so pretraining and SFT share one train_step and one evaluate."""
    return dict(zip(BATCH_KEYS, tensors))


@dataclass
class TrainData:
    sampler: object  # TokenWindowSampler | SFTDataset: .next_batch(device), .state_dict(), .load_state_dict()
    val_batches: Callable[[], Iterator[dict]]  # a fresh, deterministic pass over this rank's val batches
    n_train_tokens: int | None
    sample_prompt: list[int] | None  # token ids the text samples continue

    def next_batch(self, device) -> dict:
        return as_batch(self.sampler.next_batch(device))


def load_pretrain_tokens(args, tokenizer, show_progress: bool, model_vocab: int):
    """-> (train_tokens, val_tokens) as 1-D integer arrays (memmaps for prepared dirs)."""
    if is_prepared_dir(args.data):
        return _prepared_tokens(args, tokenizer, show_progress, model_vocab)
    if args.val_data:
        train = _tokenize(args.data, args, tokenizer, 0.0, show_progress)["train"]
        return train, _tokenize(args.val_data, args, tokenizer, 0.0, show_progress)["train"]
    split = _tokenize(args.data, args, tokenizer, VAL_FRACTION, show_progress)
    train, val = split["train"], split["val"]
    if len(train) == 0 and len(val) > 0:  # one document: the hold-out rule gave it to val; cut its tail off
        cut = int(len(val) * (1 - VAL_FRACTION))
        train, val = val[:cut], val[cut:]
    return train, val


def _tokenize(source, args, tokenizer, val_fraction, show_progress) -> dict:
    return data_utils.tokenize_documents(source, tokenizer, val_fraction=val_fraction, max_tokens=args.max_data_tokens,
                                         text_key=args.text_key, show_progress=show_progress,
                                         txt_mode=getattr(args, "txt_mode", "block"))


def _prepared_tokens(args, tokenizer, show_progress, model_vocab):
    d = Path(args.data)
    if tokenizer is not None:
        token_data.check_meta(d, tokenizer)  # refuses a .bin made with another tokenizer
    else:
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
        if int(meta.get("vocab_size", 0)) > model_vocab:
            raise TrainError(f"--data {d}: token vocab {meta.get('vocab_size')} > model vocab {model_vocab}; "
                             "pass the data's --tokenizer")
    train = token_data.read_token_file(d / "train.bin")
    val_path = d / "val.bin"
    if args.val_data:
        if tokenizer is None:
            raise TrainError("--val-data is raw text and needs a tokenizer; pass --tokenizer")
        val = _tokenize(args.val_data, args, tokenizer, 0.0, show_progress)["train"]
    elif val_path.exists() and token_data.read_token_header(val_path)["n_tokens"] > 0:
        val = token_data.read_token_file(val_path)
    else:
        raise TrainError(f"--data {d}: val.bin is missing or empty; prepare with --val-fraction > 0 "
                         "or pass --val-data FILE")
    _check_token_range(train, tokenizer.vocab_size if tokenizer is not None else model_vocab, d / "train.bin")
    return train, val


def _check_token_range(tokens, vocab_size: int, path):
    # Cheap guard on a sample: ids beyond the vocab mean the file came from another tokenizer.
    sample = np.asarray(tokens[: min(len(tokens), 1_000_000)])
    if len(sample) and int(sample.max()) >= vocab_size:
        raise TrainError(f"{path}: token id {int(sample.max())} >= vocab {vocab_size}; "
                         "the data was made with a different tokenizer, re-run prepare with this one")


def load_sft_conversations(args, world_size: int = 1):
    """Chat conversations -> (train, val): --val-data when given, else the hold-out rule over the
    conversations (HOLDOUT_RULE); with too few for a split the training set doubles as val."""
    if is_prepared_dir(args.data):
        raise TrainError(f"--stage sft --data {args.data}: a prepared dir keeps no assistant mask, so SFT reads the "
                         "chat .jsonl itself: pass --data chats.jsonl (the file you prepared from)")
    convs = token_data.read_sft_jsonl(args.data)
    if args.val_data:
        return convs, token_data.read_sft_jsonl(args.val_data)
    splits = [data_utils.holdout_split(i, VAL_FRACTION) for i in range(len(convs))]
    train = [c for c, s in zip(convs, splits) if s == "train"]
    val = [c for c, s in zip(convs, splits) if s == "val"]
    if len(val) < world_size or not train:
        return convs, convs
    return train, val


def build_data(start: RunStart, dist: Distributed, device, show_progress: bool) -> TrainData:
    args, tok = start.args, start.tokenizer
    if args.stage == "pretrain":
        return _pretrain_data(args, tok, start.cfg, dist, device, show_progress)
    if tok is None:
        raise TrainError(f"--stage sft: checkpoint {args.init_from} has no embedded tokenizer; the chat "
                         "template needs one (pass --tokenizer DIR)")
    train_convs, val_convs = load_sft_conversations(args, dist.world_size)
    sampler = token_data.SFTDataset(train_convs, tok, args.seq_len, args.batch_size, pack=True, seed=args.seed,
                            rank=dist.rank, world_size=dist.world_size)
    val_ds = token_data.SFTDataset(val_convs, tok, args.seq_len, args.batch_size, pack=True, seed=args.seed + 1,
                           rank=dist.rank, world_size=dist.world_size)
    start_state = val_ds.state_dict()

    def val_batches():
        val_ds.load_state_dict(start_state)  # the same batches at every evaluation
        for _ in range(args.eval_iters):
            yield as_batch(val_ds.next_batch(device))

    prompt = None
    first = next((c for c in val_convs if any(m["role"] == "assistant" for m in c)), None)
    if first is not None:
        turns = first[:next(i for i, m in enumerate(first) if m["role"] == "assistant")]
        prompt = tok.encode_chat(turns, add_generation_prompt=True)[0]
    return TrainData(sampler, val_batches, None, prompt)


def _pretrain_data(args, tok, cfg, dist: Distributed, device, show_progress) -> TrainData:
    train_tokens, val_tokens = load_pretrain_tokens(args, tok, show_progress, cfg.vocab_size)
    for name, tokens, fix in (("training", train_tokens, "give more data"),
                              ("validation", val_tokens, "give --val-data")):
        if len(tokens) < args.seq_len + 1:
            raise TrainError(f"--data {args.data}: only {len(tokens)} {name} tokens, fewer than --seq-len + 1 = "
                             f"{args.seq_len + 1}; {fix} or lower --seq-len")
    sampler = token_data.TokenWindowSampler(train_tokens, args.seq_len, args.batch_size, seed=args.seed,
                                    rank=dist.rank, world_size=dist.world_size)

    def val_batches():
        # the first --eval-iters contiguous windows, shared out over the ranks
        batches = token_data.iter_eval_batches(val_tokens, args.seq_len, args.batch_size, max_batches=args.eval_iters,
                                       device=device)
        for i, (x, y) in enumerate(batches):
            if i % dist.world_size == dist.rank:
                yield {"idx": x, "targets": y}

    prompt = None
    if tok is not None:  # the opening tokens of the first validation document
        prompt = [int(t) for t in val_tokens[:16]]
        if tok.eos_id in prompt[1:]:
            prompt = prompt[:prompt.index(tok.eos_id, 1)]
    return TrainData(sampler, val_batches, int(len(train_tokens)), prompt)


# ----------------------------------------------------------------------------- model / optimizer

def build_model(start: RunStart, dist: Distributed, device) -> GPT:
    seed_everything(start.args.seed + dist.rank)
    model = GPT(start.cfg)
    weights = start.ckpt or start.init
    if weights is not None:
        load_state_checked(model, weights["model"], source=str(start.resume_path or start.args.init_from))
    model.tokenizer = start.tokenizer
    return model.to(device)


def loss_chunk_budget(device) -> int:
    """Logits the training loss may hold at once on a GPU: what a tenth of its memory holds at ~12
    bytes per logit (bf16 logits, their fp32 copy and both gradients). Below that the loss is one
    fused matmul + cross-entropy; above it, chunks recomputed in backward (GPT.loss_chunk_elems,
    2^27 on a CPU, where memory is shared with everything else)."""
    return max(GPT.loss_chunk_elems, torch.cuda.get_device_properties(device).total_memory // 10 // 12)


def use_compile(args, device) -> bool:
    """--compile / --no-compile, else on for CUDA (nanoGPT's default) and off elsewhere."""
    return args.compile if args.compile is not None else device.type == "cuda"


def wrap_model(model, args, dist: Distributed, device):
    """torch.compile and DDP around the bare GPT; returns what the forward passes run through."""
    if use_compile(args, device):
        model = torch.compile(model)
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp_kw = {"device_ids": [device.index] if device.type == "cuda" else None}
    # the only buffers are the RoPE tables, identical on every rank: no per-forward broadcast
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        ddp_kw["forward_sync_buffers"] = False
    else:
        ddp_kw["broadcast_buffers"] = False
    return DDP(model, **ddp_kw)


# ----------------------------------------------------------------------------- the run's state

@dataclass
class TrainState:
    """What the training loop advances; restored from fishai-latest.pt on resume."""
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    nonfinite: int = 0  # consecutive steps with a NaN/inf loss
    last_good: Path | None = None  # the newest fishai-latest.pt this run wrote


@dataclass
class Trainer:
    """What trains: everything one optimizer step (train_step) uses, and nothing else; train.py's
    run and benchmark.py's step_runner build the same one."""
    args: argparse.Namespace
    dist: Distributed
    device: torch.device
    dtype: torch.dtype
    raw_model: GPT  # the bare GPT: saved and sampled from
    model: torch.nn.Module  # what the forward passes run through (compiled / DDP)
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    scaler: torch.amp.GradScaler
    data: "TrainData | FixedBatches"  # next_batch(device) gives the micro-batches

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.grad_accum * self.dist.world_size * self.args.seq_len


@dataclass
class RunLog:
    """What a run reports: the console, metrics.jsonl and wandb."""
    say: "Printer"
    t_start: float = 0.0  # time.time() when the command started (--max-time counts from it)
    metrics: "MetricsLog | None" = None
    wandb: "WandbLogger | None" = None

    def record(self, rec: dict) -> None:
        self.metrics.write(rec)
        self.wandb.log(rec, rec["step"])


@dataclass
class TrainRun:
    """One run of the command, built once by train(): what trains, where it writes, what it
    records (the tokenizer and train args go into every checkpoint) and how it reports."""
    trainer: Trainer
    out: Path
    tokenizer: text_tokenizer.TextTokenizer | None
    train_args: dict
    log: RunLog


def restore_state(run: TrainRun, ckpt: dict | None) -> TrainState:
    """Optimizer, scaler, data position, RNG and the step (the schedule's position) from a resumed checkpoint."""
    if ckpt is None:
        return TrainState()
    run.trainer.optimizer.load_state_dict(ckpt["optimizer"])  # (the schedule is a function of the step)
    if run.trainer.scaler.is_enabled() and ckpt.get("scaler"):
        run.trainer.scaler.load_state_dict(ckpt["scaler"])
    step, dist = int(ckpt.get("step", 0)), run.trainer.dist
    data_state = ckpt.get("data_state")
    if data_state:
        states = data_state.get("ranks") or [data_state]
        if int(data_state.get("world_size", 1)) != dist.world_size or len(states) <= dist.rank:
            # a sampler's state is (seed, batches drawn) and each rank's batches depend on its own
            # rank, so rank 0's position is a valid position for every rank
            run.log.say(f"note: checkpoint data position was saved with world_size={data_state.get('world_size')}, "
                    f"now {dist.world_size}; every rank continues from rank 0's data position")
            states = [states[0]] * dist.world_size
        run.trainer.data.sampler.load_state_dict(states[dist.rank])
    rng = ckpt.get("rng")
    if rng and int(rng.get("world_size", 1)) == dist.world_size and len(rng.get("ranks", [])) > dist.rank:
        set_rng_state(rng["ranks"][dist.rank])
    extra = ckpt.get("extra") or {}
    return TrainState(step=step, tokens_seen=int(extra.get("tokens_seen", step * run.trainer.tokens_per_step)),
                      best_val_loss=ckpt.get("best_val_loss"))


def save_latest(run: TrainRun, state: TrainState, name: str = LATEST_NAME) -> None:
    """fishai-latest.pt: everything the exact resume needs. Every rank takes part (the data
    positions and RNG states are gathered); rank 0 writes. name=STABLE_NAME writes the same
    content as fishai-stable.pt, the point a WSD run is extended from."""
    data_states = _all_gather(run.trainer.data.sampler.state_dict(), run.trainer.dist)
    rng_states = _all_gather(get_rng_state(), run.trainer.dist)
    if not run.trainer.dist.master:
        return
    path = run.out / name
    ws = run.trainer.dist.world_size
    save_checkpoint(str(path), run.trainer.raw_model, tokenizer=run.tokenizer, optimizer=run.trainer.optimizer,
                           scheduler=run.trainer.schedule, scaler=run.trainer.scaler if run.trainer.scaler.is_enabled() else None,
                           step=state.step, best_val_loss=state.best_val_loss,
                           rng_state={"world_size": ws, "ranks": rng_states},
                           data_state={"world_size": ws, "ranks": data_states},
                           train_args=run.train_args, extra=checkpoint_extra(run, state))
    if name == LATEST_NAME:
        state.last_good = path


def save_best(run: TrainRun, state: TrainState) -> None:
    """fishai-best.pt: weights, config and tokenizer (+ step and train args for the model card);
    no optimizer state, so it is a fraction of fishai-latest.pt. Rank 0 only."""
    if run.trainer.dist.master:
        save_checkpoint(str(run.out / BEST_NAME), run.trainer.raw_model, tokenizer=run.tokenizer, step=state.step,
                               best_val_loss=state.best_val_loss, train_args=run.train_args,
                               extra=checkpoint_extra(run, state))


def checkpoint_extra(run: TrainRun, state: TrainState) -> dict:
    return {"stage": run.trainer.args.stage, "tokens_seen": state.tokens_seen}


# ----------------------------------------------------------------------------- metrics / wandb / console

class Printer:
    """print() on rank 0 only, through tqdm.write while a progress bar is on screen."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


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
            common.atomic_write_text(path, "".join(k + "\n" for k in kept))
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
            raise TrainError("--wandb needs the wandb package: pip install wandb") from None
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


def plot_losses(series: list[dict], path) -> str | None:
    """PNG of train and val loss over steps, written atomically. series: [{"metrics": records of
    metrics.jsonl, "step_offset": 0, "label": None or e.g. "round 2"}, ...]. The one loss-curve
    plot (train.py at the end of every run, quick_train over its rounds). Returns a note instead
    when matplotlib is missing."""
    try:
        import matplotlib  # lazy: optional
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{Path(path).name} skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in series:
        off, label = s.get("step_offset", 0), f" ({s['label']})" if s.get("label") else ""
        tr = [(m["step"] + off, m["loss"]) for m in s["metrics"] if "loss" in m]
        va = [(m["step"] + off, m["val_loss"]) for m in s["metrics"] if "val_loss" in m]
        if tr:
            ax.plot(*zip(*tr), lw=1, label="train" + label)
        if va:
            ax.plot(*zip(*va), "o-", lw=1.5, label="val" + label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (a run stopped before its first log line has no curve yet)
        ax.legend()
    fig.tight_layout()
    try:
        common.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return None


def sample_tokens(model: GPT, ids: list[int], max_new_tokens: int, generator: torch.Generator,
                  temperature: float = 0.8, top_k: int = 40) -> list[int]:
    """Continue `ids` with up to max_new_tokens sampled tokens; returns the new ids before the
    first EOS. The draws come from `generator` alone, so training's RNG streams are untouched and
    an exact resume stays exact."""
    eos = model.tokenizer.eos_id if model.tokenizer is not None else None
    ids, n = fit_prompt(ids, max_new_tokens, model.config.max_seq_len)
    was_training = model.training
    model.eval()
    try:
        rows = generate_samples(model, ids, n, temperature=temperature, top_k=top_k, generator=generator,
                                stop_ids=[] if eos is None else [eos])
    finally:
        engine.release(model)  # the KV cache is only for this sample
        model.train(was_training)
    return rows[0]


# ----------------------------------------------------------------------------- one step, evaluation

def train_step(trainer: Trainer, step: int, hooks: FaultHooks) -> tuple[float, float, bool, int]:
    """One optimizer step of --grad-accum micro-batches (gradients synced across ranks on the last
    only). Returns (loss averaged over micro-batches and ranks, grad norm, finite, tokens on this
    rank). A NaN/inf loss is not applied (with fp16 the GradScaler skips it itself)."""
    args, model, opt, scaler = trainer.args, trainer.model, trainer.optimizer, trainer.scaler
    set_lrs(opt, trainer.schedule, step, args)
    loss_sum = torch.zeros((), device=trainer.device)
    tokens = 0
    for micro in range(args.grad_accum):
        last = micro == args.grad_accum - 1
        batch = trainer.data.next_batch(trainer.device)
        with model.no_sync() if (trainer.dist.enabled and not last) else contextlib.nullcontext():
            with common.autocast(trainer.device, trainer.dtype):
                _, loss = model(**batch)
            loss = hooks.poison(loss, step) / args.grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
        tokens += batch["targets"].numel()
    grad_norm = torch.zeros((), device=trainer.device)
    if args.grad_clip > 0:
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainer.raw_model.parameters(), args.grad_clip)
    # one host sync per step (loss and grad norm in one copy): whether the step is applied depends
    # on them. It comes after the backward pass is queued, so the GPU is busy while the host waits.
    loss_val, gn = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()
    loss_val = _all_reduce_mean(loss_val, trainer.dist, trainer.device)
    finite = math.isfinite(loss_val) and (scaler.is_enabled() or math.isfinite(gn))
    if finite or scaler.is_enabled():
        scaler.step(opt)  # with fp16 the scaler skips steps with inf/nan grads and lowers its scale
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss_val, gn, finite, tokens


class FixedBatches:
    """Batches that cycle through given (x, y) tensors already on the device: what step_runner
    feeds the real train_step when only the step's speed is measured."""

    def __init__(self, batches: list[tuple]):
        self.batches, self.i = batches, 0

    def next_batch(self, device) -> dict:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return as_batch(batch)


def step_runner(model, args: argparse.Namespace, device, dtype, batches: list[tuple]) -> Callable[[], float]:
    """A callable running one real train_step (args' optimizer, schedule, clipping, accumulation and
    --compile, as train.py runs them) on `model` over fixed `batches`; returns the step's loss. What
    benchmark.py times as the training step. `model` is a GPT or anything with its forward and
    parameter names (benchmark.py's LlamaForCausalLM adapter)."""
    device, dist = torch.device(device), Distributed()
    trainer = build_trainer(model, args, dist, device, dtype, FixedBatches(batches))
    model.train()
    hooks, step = FaultHooks(), [0]

    def one_step() -> float:
        loss, _, _, _ = train_step(trainer, step[0], hooks)
        step[0] += 1
        return loss

    one_step.trainer = trainer  # its parts (model, optimizer) for timing them one by one
    return one_step


@torch.no_grad()
def evaluate(model, batches, device, dtype, dist: Distributed) -> float:
    """Mean loss per target token over `batches` (this rank's share; targets not IGNORE_INDEX and,
    for SFT, under loss_mask), averaged over all ranks; NaN when there is no target token."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        on = batch["targets"] != IGNORE_INDEX
        if batch.get("loss_mask") is not None:
            on &= batch["loss_mask"].bool()
        n = on.sum()
        with common.autocast(device, dtype):
            _, loss = model(**batch)
        total[0] += loss.double() * n
        total[1] += n
    _all_reduce_sum_tensor(total, dist)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def evaluate_and_keep_best(run: TrainRun, state: TrainState, train_loss: float) -> None:
    val = evaluate(run.trainer.model, run.trainer.data.val_batches(), run.trainer.device, run.trainer.dtype, run.trainer.dist)
    improved = math.isfinite(val) and (state.best_val_loss is None or val < state.best_val_loss)
    if improved:
        state.best_val_loss = val
    state.last_val_loss = val
    ppl = math.exp(min(val, 50.0)) if math.isfinite(val) else float("nan")
    run.log.record({"step": state.step, "val_loss": val, "val_ppl": ppl, "best_val_loss": state.best_val_loss})
    run.log.say(f"step {state.step}: train loss {train_loss:.4f}, val loss {val:.4f}, val ppl {ppl:.2f}"
            + (" (best)" if improved else ""))
    if improved:
        save_best(run, state)


def print_sample(run: TrainRun, step: int) -> None:
    """A text sample from the current weights (rank 0), continuing the first val document."""
    if not run.trainer.dist.master or run.tokenizer is None or not run.trainer.data.sample_prompt:
        return
    gen = torch.Generator(device=run.trainer.device).manual_seed(run.trainer.args.seed + step)
    with common.autocast(run.trainer.device, run.trainer.dtype):
        new = sample_tokens(run.trainer.raw_model, run.trainer.data.sample_prompt, run.trainer.args.max_new_tokens, gen)
    text = run.tokenizer.decode(run.trainer.data.sample_prompt) + run.tokenizer.decode(new)
    run.log.metrics.write({"step": step, "sample": text})
    run.log.say(f"sample at step {step}: {text!r}")


# ----------------------------------------------------------------------------- the loop

class SpeedMeter:
    """Tokens/s over the steps since the last log line (evaluation time left out)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t, self.tokens = time.time(), 0

    def rate(self) -> float:
        return self.tokens / max(time.time() - self.t, 1e-9)


def log_step(run: TrainRun, state: TrainState, loss: float, gn: float, speed: SpeedMeter, bar) -> None:
    lr, tps = run.trainer.schedule.lr_at(state.step - 1), speed.rate()
    rec = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": gn, "tokens_per_sec": tps,
           "tokens": state.tokens_seen, "time": time.time() - run.log.t_start}
    peak = device_peak_flops(run.trainer.device, run.trainer.dtype)
    if peak:
        rec["mfu"] = estimate_mfu(tps, run.trainer.raw_model.config, run.trainer.args.seq_len, peak * run.trainer.dist.world_size)
    run.log.record(rec)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
    speed.reset()


def check_finite(run: TrainRun, state: TrainState, finite: bool, loss: float, gn: float) -> None:
    if finite:
        state.nonfinite = 0
        return
    state.nonfinite += 1
    run.log.say(f"warning: step {state.step - 1}: non-finite loss ({loss}) / grad norm ({gn}); step skipped "
            f"({state.nonfinite}/{run.trainer.args.max_nonfinite} in a row)")
    if state.nonfinite >= run.trainer.args.max_nonfinite:
        kept = f"the last good checkpoint is {state.last_good}" if state.last_good else "no checkpoint was written yet"
        raise DivergedError(f"loss was NaN/inf for {state.nonfinite} consecutive steps (up to step {state.step}); "
                            f"stopping, {kept}. Lower --lr, raise --warmup or use --dtype bf16/fp32")


def agree_on_stop(run: TrainRun, stop: "StopFlag") -> tuple[bool, bool]:
    """(signal received, --max-time reached), agreed by all ranks: a rank that stopped alone would
    leave the others hanging in the next all-reduce."""
    timed_out = run.trainer.args.max_time is not None and time.time() - run.log.t_start >= run.trainer.args.max_time
    flags = [1.0 if stop.signum is not None else 0.0, 1.0 if timed_out else 0.0]
    if run.trainer.dist.enabled:
        ft = torch.tensor(flags, device=run.trainer.device)
        _all_reduce_sum_tensor(ft, run.trainer.dist)
        flags = ft.tolist()
    return flags[0] > 0, flags[1] > 0


def stop_reason(run: TrainRun, state: TrainState, stop: "StopFlag", signalled: bool, paused: bool,
                timed_out: bool) -> str | None:
    """Why the run stops after this step (a line saying so and how to continue), or None."""
    args, latest = run.trainer.args, run.out / LATEST_NAME
    if signalled:
        name = signal.Signals(stop.signum).name if stop.signum else "signal on another rank"
        run.log.say(f"{name}: saved {latest} at step {state.step}; resume with --resume auto")
        return name
    if paused:
        run.log.say(f"--stop-at {args.stop_at}: saved {latest} at step {state.step}; continue with --resume auto")
        return "stop_at"
    if timed_out and state.step < args.max_steps:
        run.log.say(f"--max-time {args.max_time:.0f} s reached at step {state.step}/{args.max_steps}: saved {latest}; "
                "continue with --resume auto")
        return "max_time"
    return None


def progress_bar(run: TrainRun, state: TrainState):
    from tqdm import tqdm
    return tqdm(total=run.trainer.args.max_steps, initial=state.step, desc=run.trainer.args.stage, unit="step", dynamic_ncols=True,
                disable=not (run.trainer.dist.master and not run.trainer.args.quiet), leave=True)


def train_loop(run: TrainRun, state: TrainState) -> str | None:
    """Train until --max-steps or a stop (signal, --stop-at, --max-time), evaluating, sampling and
    saving as due; returns why it stopped (None: --max-steps reached)."""
    args, hooks, stop, speed = run.trainer.args, FaultHooks(), StopFlag(), SpeedMeter()
    bar = run.log.say.bar = progress_bar(run, state)
    stop.install()
    run.trainer.model.train()
    try:
        while state.step < args.max_steps:
            hooks.before_step(state.step, run.trainer.dist.rank)
            loss, gn, finite, tokens = train_step(run.trainer, state.step, hooks)
            state.step += 1
            state.tokens_seen += run.trainer.tokens_per_step
            speed.tokens += tokens * run.trainer.dist.world_size
            bar.update(1)
            check_finite(run, state, finite, loss, gn)
            step, last = state.step, state.step == args.max_steps
            if step % args.log_interval == 0 or last:
                log_step(run, state, loss, gn, speed, bar)
            signalled, timed_out = agree_on_stop(run, stop)
            if step % args.eval_interval == 0 or last or timed_out:
                evaluate_and_keep_best(run, state, loss)
                speed.t = time.time()  # evaluation time is not training speed
            if args.sample_interval and step % args.sample_interval == 0:
                print_sample(run, step)
            if isinstance(run.trainer.schedule, WSDSchedule) and step == run.trainer.schedule.decay_start < args.max_steps:
                save_latest(run, state, STABLE_NAME)  # the end of the stable phase: extend the run from here
            paused = args.stop_at is not None and step >= args.stop_at
            # during a NaN/inf streak keep the last good fishai-latest.pt (the streak may end the run)
            if ((step % args.save_interval == 0 or last) and state.nonfinite == 0) or signalled or paused or timed_out:
                save_latest(run, state)
            reason = stop_reason(run, state, stop, signalled, paused, timed_out)
            if reason:
                return reason
        return None
    except torch.cuda.OutOfMemoryError:
        raise TrainFailed(f"CUDA out of memory with --batch-size {args.batch_size} --seq-len {args.seq_len}: lower "
                          f"--batch-size (raise --grad-accum to keep {args.batch_size * args.grad_accum} sequences "
                          f"per step) or lower --seq-len") from None
    finally:
        bar.close()
        run.log.say.bar = None
        stop.restore()


class StopFlag:
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


# ----------------------------------------------------------------------------- train()

def train(args: argparse.Namespace) -> dict:
    """Run training as configured by `args` (parse_args / make_args): set up (start point, device,
    data, model, optimizer), train_loop, then the end-of-run records. Returns a summary dict:
    steps, tokens, best_val_loss, last_val_loss, elapsed_s, latest/best checkpoint paths,
    interrupted (signal name or None), stopped_by ("signal", "stop_at", "max_time" or None)."""
    t_start, dist = time.time(), setup_distributed()
    say = Printer(dist.master)
    ok, created, out = False, False, Path(args.output_dir)
    try:
        common.check_plan(*output_plan(args), args.overwrite)
        start = resolve_start(args, dist, say)
        device = setup_device(start.args.device, dist)
        created = common.check_writable_dir(out) if dist.master else False
        run = build_run(start, dist, device, out, say, t_start)
        state = restore_state(run, start.ckpt)
        describe_run(run, start, state)
        if start.ckpt is not None and state.step >= run.trainer.args.max_steps:
            say(already_finished(run, state))
        run.log.metrics = MetricsLog(out / METRICS_NAME, dist.master, state.step if start.ckpt is not None else None)
        run.log.wandb = WandbLogger(run.trainer.args, run.trainer.args.wandb and dist.master, {**run.train_args,
                                "model_config": start.cfg.to_dict()}, out)
        try:
            reason = train_loop(run, state)  # the training
            summary = finish_run(run, state, reason)
        finally:
            run.log.metrics.close()
        ok = True
        return summary
    except BaseException:
        if created and not any((out / n).exists() for n in (LATEST_NAME, BEST_NAME)):
            shutil.rmtree(out, ignore_errors=True)  # a failed run leaves nothing behind
        raise
    finally:
        teardown_distributed(dist, ok)


def teardown_distributed(dist: Distributed, ok: bool) -> None:
    if not dist.enabled:
        return
    import torch.distributed as tdist
    if tdist.is_initialized():
        if ok:
            # every rank reaches the end before any tears the group down: a rank that destroys
            # its gloo context while a peer still talks to it can crash the peer
            tdist.barrier()
        tdist.destroy_process_group()


def build_run(start: RunStart, dist: Distributed, device, out: Path, say: Printer, t_start: float) -> TrainRun:
    args = start.args
    dtype = common.resolve_dtype(args.dtype, device)
    data = build_data(start, dist, device, dist.master and not args.quiet)
    raw_model = build_model(start, dist, device)
    train_args = {k: v for k, v in vars(args).items() if not k.startswith("_") and
                  (isinstance(v, (str, int, float, bool, type(None))) or k == "model_override")}
    train_args["world_size"] = dist.world_size
    run = TrainRun(trainer=build_trainer(raw_model, args, dist, device, dtype, data), out=out,
                   tokenizer=start.tokenizer, train_args=train_args, log=RunLog(say, t_start))
    run.train_args["tokens_per_step"] = run.trainer.tokens_per_step
    return run


def build_trainer(raw_model, args: argparse.Namespace, dist: Distributed, device, dtype, data) -> Trainer:
    """What trains `raw_model` on `data` (train.py's run and benchmark.py's step_runner alike): the
    wrapped (compiled / DDP) model, the optimizer, the schedule and the fp16 GradScaler; on a GPU the
    loss is chunked only above a memory budget (loss_chunk_budget)."""
    if device.type == "cuda" and isinstance(raw_model, GPT):
        raw_model.loss_chunk_elems = loss_chunk_budget(device)
    return Trainer(args=args, dist=dist, device=device, dtype=dtype, raw_model=raw_model,
                   model=wrap_model(raw_model, args, dist, device),
                   optimizer=build_optimizer(raw_model, args, device, dist.rank, dist.world_size),
                   schedule=build_schedule(args), scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                   data=data)


def already_finished(run: TrainRun, state: TrainState) -> str:
    stable = run.out / STABLE_NAME
    how = (f"--resume {stable} --max-steps MORE (the WSD decay moves to the new end: no LR jump)" if stable.exists()
           else "--resume auto --max-steps MORE")
    return (f"the run in {run.out} had already finished at step {state.step} (--max-steps {run.trainer.args.max_steps}): "
            f"nothing to train; to train longer: {how}")


def describe_run(run: TrainRun, start: RunStart, state: TrainState) -> None:
    args, cfg, tok, say = run.trainer.args, start.cfg, start.tokenizer, run.log.say
    if start.ckpt is not None:
        best = state.best_val_loss
        say(f"resumed from {start.resume_path} at step {state.step}" + (f" (best val loss {best:.4f})" if best else ""))
    elif start.init is not None:
        say(f"initialised weights from {args.init_from} (step {start.init.get('step', '?')}); fresh optimizer")
    say(f"model: config {start.config_name}, {run.trainer.raw_model.num_params() / 1e6:.2f}M params, vocab "
        f"{cfg.vocab_size} (tokenizer {tok.vocab_size if tok is not None else 'none: preset vocab'}), seq_len "
        f"{args.seq_len}; device {run.trainer.device}, dtype {str(run.trainer.dtype).replace('torch.', '')}"
        f"{' + GradScaler' if run.trainer.scaler.is_enabled() else ''}{', compiled' if use_compile(args, run.trainer.device) else ''}")
    n_train, ws = run.trainer.data.n_train_tokens, run.trainer.dist.world_size
    say(f"batch: {args.batch_size} seq x {args.grad_accum} accum x {ws} procs = "
        f"{args.batch_size * args.grad_accum * ws} sequences, {run.trainer.tokens_per_step:,} tokens/step; "
        f"{args.stage} on {args.data}" + (f" ({n_train:,} train tokens)" if n_train else ""))


def finish_run(run: TrainRun, state: TrainState, reason: str | None) -> dict:
    """The end-of-run records (metrics 'end' line, wandb summary, loss curve) and the summary."""
    args, out = run.trainer.args, run.out
    elapsed = time.time() - run.log.t_start
    interrupted = None if reason in (None, "stop_at", "max_time") else reason
    run.log.metrics.write({"step": state.step, "event": "end", "elapsed_s": elapsed,
                       "best_val_loss": state.best_val_loss, "interrupted": interrupted})
    best = out / BEST_NAME
    summary = {"steps": state.step, "tokens": state.tokens_seen, "best_val_loss": state.best_val_loss,
               "last_val_loss": state.last_val_loss, "elapsed_s": elapsed, "seq_len": args.seq_len, "lr": args.lr,
               "latest": str(out / LATEST_NAME), "best": str(best) if best.exists() else None,
               "interrupted": interrupted, "stopped_by": "signal" if interrupted else reason,
               "world_size": run.trainer.dist.world_size, "tokens_per_step": run.trainer.tokens_per_step}
    run.log.wandb.finish({"final_checkpoint": summary["latest"], "best_checkpoint": summary["best"],
                      "best_val_loss": state.best_val_loss})
    if run.trainer.dist.master:
        note = plot_losses([{"metrics": read_metrics(out / METRICS_NAME)}], out / LOSS_CURVE_NAME)
        run.log.say(f"note: {note}" if note else f"loss curve: {out / LOSS_CURVE_NAME}")
    best_txt = "none yet" if state.best_val_loss is None else f"{state.best_val_loss:.4f}"
    run.log.say(f"done: {state.step} steps, {state.tokens_seen:,} tokens in {elapsed:.1f}s; best val loss "
            f"{best_txt}; checkpoints in {out}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not faulthandler.is_enabled():
        # a worker that dies on a signal under torchrun shows only "exitcode -11"; this prints
        # the Python stack of every thread to that worker's stderr first
        faulthandler.enable()
    # TrainFailed (out of memory, divergence): exit 1; a SIGINT-stopped run: exit 130
    return common.run_cli(train, args)


if __name__ == "__main__":
    sys.exit(main())
