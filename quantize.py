"""
Quantized export of a FishAI model: one self-describing binary (docs/FORMAT.md), a
Hugging Face LlamaForCausalLM directory (with a model card), or a llama-architecture GGUF file.

Usage (copy-paste):

    # the seed's export: FP16 embedding/norms, INT8 Q/K, INT4 group-128 V/O/FFN
    python quantize.py --model checkpoints/fishai-best.pt --output fishai-small-mixed.bin --strategy mixed

    # all matmul weights + tied embedding INT4 (group 128), with bits/byte and perplexity before/after
    python quantize.py --model checkpoints/fishai-best.pt --output fishai-small-int4.bin --strategy int4 \
        --eval-data wikitext103 --limit 50 --json int4.json

    # GPTQ-style error-compensating quantization from calibration text
    python quantize.py --model checkpoints/fishai-best.pt --output fishai-small-int4-gptq.bin --strategy int4 \
        --calibration-data data/raw/train.txt --calibration-samples 128

    # Hugging Face directory (LlamaForCausalLM, FP16, README.md model card) and GGUF for llama.cpp
    python quantize.py --model checkpoints/fishai-best.pt --output hf-fishai --format hf --strategy fp16
    python quantize.py --model checkpoints/fishai-best.pt --output fishai.gguf --format gguf --strategy mixed

An existing output is only replaced with --overwrite. The .bin file loads anywhere a model is
accepted: `model.load_model("fishai-small-int4.bin")` (benchmark.py, evaluate.py, generate.py), and
runs quantized: int8/int4 layers on torch's int8/int4 kernels (the memory of the file, about 3x
faster batch-1 decoding than fp32 on CPU; see "Running quantized" below and docs/FORMAT.md).
`load_model(path, dequantize=True)` (`--dequantize` in benchmark.py full, evaluate.py and generate.py)
gives plain float weights instead.

Strategies (2-D matmul weights and the tied embedding; 1-D RMSNorm gammas are always FP16):
    fp32   lossless reference (FP32 everywhere)
    fp16   everything FP16
    int8   per-output-row symmetric INT8 (fp16 scale per row) for every matmul weight and the embedding
    int4   asymmetric INT4, per group of --group-size elements along each row (fp16 scale + zero point),
           for every matmul weight AND the tied embedding
    mixed  embedding FP16; wq/wk INT8; wv/wo/w_gate/w_up/w_down INT4
Rows whose length is not a multiple of the group size end with one shorter group (no padding values
are stored; see docs/FORMAT.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import data_utils
from model import external_name, is_hf_output, load_checkpoint, load_model, param_shapes, save_hf
from quantized import (DEFAULT_GROUP_SIZE, QTensor, QuantizeError, _check_group_size, _n_groups,
                       int4_codes, int4_params, int8_codes, int8_row_scales, quantize_rtn, write_quantized)
import scoring

STRATEGIES = ("fp32", "fp16", "int8", "int4", "mixed")
FORMATS = ("bin", "hf", "gguf")


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(
        description="Export a FishAI checkpoint as a quantized .bin (docs/FORMAT.md), an HF Llama directory\n"
                    "(with a README.md model card) or a GGUF file, and report size and quality.")
    p.add_argument("--model", default="checkpoints/fishai-best.pt",
                   help="source model: a .pt checkpoint (or anything model.load_model reads); "
                        "default checkpoints/fishai-best.pt, what train.py writes")
    p.add_argument("--output", default=None, help="output .bin / .gguf file, or directory for --format hf "
                   "(default fishai-<strategy>.bin / .gguf, or fishai-hf/)")
    p.add_argument("--format", choices=FORMATS, default="bin", help="bin: FishAI quantized file; hf: "
                   "LlamaForCausalLM directory; gguf: llama.cpp file")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="precision plan (default: mixed for bin/gguf, fp16 for hf; hf accepts fp16/fp32)")
    p.add_argument("--group-size", type=common.int_flag(1), default=DEFAULT_GROUP_SIZE,
                   help="INT4 elements per scale/zero-point group along each row "
                        "(.bin; GGUF Q4_0 always uses blocks of 32)")
    p.add_argument("--calibration-data", metavar="PATH", default=None,
                   help="text for GPTQ-style error-compensating quantization (txt/jsonl/parquet/dir/hf:NAME); "
                        "default: round-to-nearest")
    p.add_argument("--calibration-samples", type=common.int_flag(1), default=128, help="calibration windows")
    p.add_argument("--calibration-seq-len", type=common.int_flag(1), default=None,
                   help="tokens per calibration window (default: min(512, model max_seq_len))")
    p.add_argument("--damp", type=common.float_flag(0, lo_open=True), default=0.01,
                   help="GPTQ dampening, fraction of mean diag(H)")
    p.add_argument("--eval-data", default=None, help="bits/byte and perplexity before/after on this text: "
                   "wikitext103, wikitext2 or ptb (HF download), NAME:PATH for a local copy (e.g. "
                   "wikitext103:../shared/data/wikitext103), a wiki.*.tokens file, a plain text file (scored as one text, "
                   "as benchmark.py full scores it) or a jsonl/parquet/directory of documents")
    p.add_argument("--limit", type=common.int_flag(1), default=None,
                   help="use only the first N --eval-data documents (default: all)")
    p.add_argument("--eval-limit", dest="limit", type=common.int_flag(1), help=argparse.SUPPRESS)
    p.add_argument("--eval-batch-size", type=common.int_flag(1), default=8, help="windows per scoring batch")
    p.add_argument("--seed", type=common.int_flag(0), default=0, help="calibration window sampling seed (default: 0)")
    common.add_overwrite_flag(p, "an existing --output (and --json) file or directory")
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    common.add_quiet_flag(p)
    return p


def plan_qtype(name: str, shape, strategy: str) -> str:
    """Quant type of one parameter under a strategy. 1-D tensors (RMSNorm gammas) stay FP16
    (FP32 under fp32): they are tiny and every activation passes through them."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    if strategy == "fp32":
        return "f32"
    if len(shape) != 2 or strategy == "fp16":
        return "f16"
    if strategy == "int8":
        return "q8"
    if strategy == "int4":
        return "q4"
    # mixed (the seed's table): embedding FP16, Q/K INT8 (attention logits are the most
    # sensitive to rounding), everything else INT4.
    if name == "tok_emb.weight":
        return "f16"
    if name.endswith("attn.wq.weight") or name.endswith("attn.wk.weight"):
        return "q8"
    return "q4"


def quant_error(w: torch.Tensor, deq: torch.Tensor) -> dict:
    w = w.float()
    diff = (deq.float() - w).abs()
    denom = w.norm().item()
    return {"max_abs_err": diff.max().item() if diff.numel() else 0.0,
            "mean_abs_err": diff.mean().item() if diff.numel() else 0.0,
            "rel_err": (diff.norm().item() / denom) if denom > 0 else 0.0}


# ----------------------------------------------------------------------------------------------
# GPTQ-style calibrated quantization

class _Q8Grid:
    """GPTQ's INT8 grid: one scale per row, from the original weights."""

    def __init__(self, w: torch.Tensor, name: str):
        self.scales = int8_row_scales(w, name)

    def start_block(self, i1: int, block: torch.Tensor) -> None:
        pass  # the row scales cover every column

    def round(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int8_codes(col, self.scales)
        return c, c * self.scales.float()

    def qtensor(self, codes: torch.Tensor, shape: tuple) -> QTensor:
        return QTensor("q8", shape, codes.to(torch.int8), scales=self.scales, method="gptq")


class _Q4Grid:
    """GPTQ's INT4 grid: a group's scale and zero point are chosen when its first column is
    reached, from the weights as the earlier columns' error updates left them."""

    def __init__(self, rows: int, cols: int, group_size: int, name: str):
        ng = _n_groups(cols, group_size)
        self.scales = torch.zeros(rows, ng, dtype=torch.float16)
        self.zeros = torch.zeros(rows, ng, dtype=torch.float16)
        self.group_size, self.name, self.g = group_size, name, 0

    def start_block(self, i1: int, block: torch.Tensor) -> None:
        self.g = i1 // self.group_size
        self.scales[:, self.g], self.zeros[:, self.g] = int4_params(block, self.name)

    def round(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.scales[:, self.g], self.zeros[:, self.g]
        c = int4_codes(col, s, z)
        return c, (c - z.float()) * s.float()

    def qtensor(self, codes: torch.Tensor, shape: tuple) -> QTensor:
        return QTensor("q4", shape, codes.to(torch.uint8), scales=self.scales, zeros=self.zeros,
                       group_size=self.group_size, method="gptq")


def _inverse_hessian_factor(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, which GPTQ's column updates use. Dampening keeps H positive
    definite; it grows tenfold while Cholesky still fails (a rank-deficient H)."""
    base = damp * torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(H + base * (10 ** attempt) * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
        except RuntimeError:
            continue
    raise QuantizeError(f"{name}: calibration Hessian is not positive definite even with dampening; "
                        "give more or other --calibration-data, or a larger --damp")


def _gptq_sweep(W: torch.Tensor, Hinv: torch.Tensor, grid, block_size: int) -> torch.Tensor:
    """Quantize W's columns left to right on `grid`, spreading each column's rounding error over the
    columns not yet quantized (within a block at once, onto later blocks in one matmul). Returns codes."""
    rows, cols = W.shape
    codes = torch.zeros(rows, cols, dtype=torch.float32)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        grid.start_block(i1, W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            c, q = grid.round(col)
            codes[:, i1 + i] = c
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, qtype: str, group_size: int = DEFAULT_GROUP_SIZE,
                  damp: float = 0.01, block_size: int = 128, name: str = "tensor") -> QTensor:
    """Quantize W (out, in) column by column, spreading each column's rounding error over the not yet
    quantized columns through the inverse Hessian H = 2 X^T X / n of the layer inputs (GPTQ,
    Frantar et al. 2022, without act-order). q4 params are chosen per group when the group's first
    column is reached (from the already error-updated weights); q8 keeps one scale per row from the
    original weights. Returns the same QTensor layout as quantize_rtn."""
    if qtype not in ("q4", "q8"):
        return quantize_rtn(w, qtype, group_size, name)
    W = w.detach().float().cpu().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    H = H.detach().double().cpu().clone()
    dead = torch.diag(H) == 0                  # inputs that were always zero: weight is irrelevant
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_hessian_factor(H, damp, name)
    if qtype == "q8":
        grid = _Q8Grid(w.detach().float().cpu(), name)
    else:
        _check_group_size(group_size)
        grid = _Q4Grid(rows, cols, group_size, name)
        block_size = group_size                # blocks == groups: a group's params see all updates
    return grid.qtensor(_gptq_sweep(W, Hinv, grid, block_size), (rows, cols))


class _StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early (no logits needed)."""


def _accumulate_hessians(model, modules: dict, batches: list, stop_module):
    """H = 2/n sum x x^T over every input row x of each module. The forward pass stops after
    stop_module."""
    H, count, hooks = {}, {}, []

    def make_hook(key):
        def hook(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            if key not in H:
                H[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                count[key] = 0
            H[key] += 2.0 * x.T @ x
            count[key] += x.shape[0]
        return hook

    for key, mod in modules.items():
        hooks.append(mod.register_forward_hook(make_hook(key)))

    def stop(mod, inp, out):
        raise _StopForward

    hooks.append(stop_module.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(b)
                except _StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {k: H[k] / max(count[k], 1) for k in H}


def gptq_quantize_model(gpt, plan: dict, batches: list, group_size: int, damp: float = 0.01,
                        progress: bool = True) -> dict:
    """Sequential GPTQ over the transformer blocks: block i's Hessians are measured with blocks < i
    already quantized (so later layers compensate earlier error), then its linears are quantized.
    The tied embedding keeps round-to-nearest: GPTQ would tune it as the output head only, and the
    error it moves between columns then lands on every input embedding (measured on the test
    model: int4 perplexity +0.83% with a GPTQ'd embedding vs +0.53% RTN, on python-docs).
    Modifies a copy of the weights in place; returns {param name: QTensor} for the q4/q8 params."""
    out = {}
    module_names = {m: n for n, m in gpt.named_modules()}
    for blk in tqdm(list(gpt.layers), desc="gptq", unit="layer", disable=not progress):
        linears = {module_names[m] + ".weight": m for m in blk.modules() if isinstance(m, torch.nn.Linear)}
        linears = {pname: m for pname, m in linears.items() if plan.get(pname) in ("q4", "q8")}
        if not linears:
            continue
        Hs = _accumulate_hessians(gpt, linears, batches, blk)
        for pname, m in linears.items():
            qt = gptq_quantize(m.weight, Hs[pname], plan[pname], group_size, damp, name=pname)
            m.weight.data.copy_(qt.dequantize().to(m.weight.dtype))
            out[pname] = qt
    return out


def calibration_batches(tokenizer, source: str, n_samples: int, seq_len: int, batch_size: int = 8,
                        seed: int = 0, show_progress: bool = False) -> list:
    """n_samples random windows of seq_len tokens from the documents in source (any data_utils
    source: txt, jsonl, parquet, dir, glob, hf:NAME), tokenized by data_utils.tokenize_documents
    (documents joined with EOS, as prepare writes them)."""
    if tokenizer is None:
        raise QuantizeError("--calibration-data needs a tokenizer, and the checkpoint has none embedded")
    need = max(n_samples * seq_len * 2, seq_len + 1)     # enough text for non-overlapping windows
    ids = data_utils.tokenize_documents(source, tokenizer, max_tokens=need, show_progress=show_progress)["train"]
    if len(ids) < seq_len + 1:
        raise QuantizeError(f"--calibration-data {source}: only {len(ids)} tokens, need at least {seq_len + 1}")
    data = torch.from_numpy(ids.astype(np.int64))
    n_windows = len(ids) // seq_len
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n_windows, generator=g)[:n_samples] * seq_len
    windows = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


# ----------------------------------------------------------------------------------------------
# Export drivers

def quantize_model(gpt, strategy: str, group_size: int = DEFAULT_GROUP_SIZE, calibration: list | None = None,
                   damp: float = 0.01, progress: bool = True) -> tuple[dict, list[dict]]:
    """Quantize every parameter of a GPT. calibration: list of LongTensor (B, T) batches for GPTQ
    (None = round-to-nearest). Returns ({name: QTensor}, per-tensor report rows)."""
    state = {k: v.detach().float().cpu() for k, v in gpt.state_dict().items()}
    plan = {k: plan_qtype(k, v.shape, strategy) for k, v in state.items()}
    if "q4" in plan.values():
        _check_group_size(group_size)         # before the calibration passes, not after them
    calibrated = {}
    if calibration and any(q in ("q4", "q8") for q in plan.values()):
        work = copy.deepcopy(gpt).float().cpu().eval()
        calibrated = gptq_quantize_model(work, plan, calibration, group_size, damp, progress)
    tensors, rows = {}, []
    for name, w in tqdm(state.items(), desc="quantize", unit="tensor", disable=not progress):
        qt = calibrated.get(name) or quantize_rtn(w, plan[name], group_size, name)
        tensors[name] = qt
        nbytes = qt.nbytes
        rows.append({"name": name, "qtype": qt.qtype, "method": qt.method if qt.qtype in ("q4", "q8") else "-",
                     "shape": list(qt.shape), "params": w.numel(), "bytes": nbytes,
                     "bits_per_weight": 8.0 * nbytes / max(w.numel(), 1),
                     "group_size": qt.group_size, **quant_error(w, qt.dequantize())})
    return tensors, rows


def size_summary(rows: list[dict], file_bytes: int, source_bytes: int | None = None) -> dict:
    params = sum(r["params"] for r in rows)
    by_type: dict[str, dict] = {}
    for r in rows:
        t = by_type.setdefault(r["qtype"], {"tensors": 0, "params": 0, "bytes": 0})
        t["tensors"] += 1
        t["params"] += r["params"]
        t["bytes"] += r["bytes"]
    out = {"params": params, "file_bytes": file_bytes, "fp32_bytes": 4 * params, "fp16_bytes": 2 * params,
           "compression_vs_fp32": 4 * params / file_bytes, "compression_vs_fp16": 2 * params / file_bytes,
           "bits_per_weight": 8.0 * file_bytes / params, "by_qtype": by_type}
    if source_bytes is not None:
        out["source_file_bytes"] = source_bytes
        out["compression_vs_source_file"] = source_bytes / file_bytes
    return out


# ----------------------------------------------------------------------------------------------
# Quality before/after: bits/byte and perplexity with the project's scoring (scoring.py)

def load_eval_texts(spec: str, limit: int | None = None) -> list[str]:
    """The --eval-data texts (scoring.parse_eval_spec, scoring.load_eval_texts): "wikitext103" |
    "wikitext2" | "ptb" (HF download), "NAME:PATH" (a local copy of that set), a WikiText file or
    directory, or any other file/dir/glob of text. limit: the first N texts."""
    name, path = scoring.parse_eval_spec(spec)
    try:
        return scoring.load_eval_texts(name, path, limit=limit)
    except scoring.ScoringError as e:
        raise QuantizeError(f"--eval-data {spec}: {e}") from None


def eval_perplexity(spec, texts: list[str], batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity with the project's scoring (the numbers benchmark.py reports for the same file)."""
    lm = scoring.load_lm(str(spec), device="cpu")
    return scoring.perplexity(lm, texts, batch_size=batch_size, progress=progress)


PPL_KEYS = ("bits_per_byte", "token_ppl", "word_ppl", "char_ppl")


def ppl_delta(before: dict, after: dict) -> dict:
    return {k: after[k] / before[k] - 1.0 for k in PPL_KEYS
            if before.get(k) and after.get(k) is not None}


def format_perplexity(p: dict) -> str:
    """The console line of the report. Bits/byte leads: it compares across tokenizers and
    languages. Then token perplexity, and word perplexity for text with spaces between words or
    character perplexity for text without (Chinese, where a whitespace "word" is a whole sentence).
    `spaced` / `char_ppl` come from scoring.perplexity (absent: treated as spaced text)."""
    before, after, change = p["before"], p["after"], p["relative_change"]

    def pair(label, key, digits):
        text = f"{label} {before[key]:.{digits}f} -> {after[key]:.{digits}f}"
        return text + (f" ({change[key]:+.2%})" if key in change else "")

    parts = [pair("bits/byte", "bits_per_byte", 4), pair("token ppl", "token_ppl", 3)]
    if before.get("spaced", True):
        parts.append(pair("word ppl", "word_ppl", 3))
    elif before.get("char_ppl") is not None:
        parts.append(pair("char ppl", "char_ppl", 3))
    return f"perplexity on {p['data']} ({p['documents']} docs): " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# The HF model card (README.md of --format hf)

def training_record(src: Path) -> dict | None:
    """step / best_val_loss / train_args / extra of a training checkpoint (.pt); None for a
    quantized .bin or an HF directory, which keep no training record."""
    if not src.is_file() or common.file_kind(src) == "quantized":
        return None
    ckpt = load_checkpoint(src)
    return {k: ckpt.get(k) for k in ("step", "best_val_loss", "train_args", "extra")}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _card_training(source: Path, record: dict | None) -> list[str]:
    if record is None:
        return [f"Not recorded: the source `{source.name}` is a quantized export or an HF directory, which keep "
                "no training record. Export from the training checkpoint (`.pt`) to list it here."]
    args, extra = record.get("train_args") or {}, record.get("extra") or {}
    lines = [f"- source checkpoint: `{source.name}`, after {record.get('step')} optimizer steps"]
    if "data" in args:
        lines.append(f"- training data: `{args['data']}`" + (f" ({args['stage']})" if args.get("stage") else ""))
    if record.get("best_val_loss") is not None:
        lines.append(f"- best validation loss: {record['best_val_loss']:.4f}")
    lines += [f"- {k}: {_cell(v)}" for k, v in sorted(extra.items())]
    if args:
        lines += ["", "Training settings (the checkpoint's `train_args`):", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(args.items())]
    return lines


def _card_architecture(gpt, dtype_label: str) -> list[str]:
    c = gpt.config
    return ["| | |", "|---|---|",
            f"| parameters | {gpt.num_params():,} (the tied input/output embedding counted once) |",
            f"| weights | {dtype_label} |",
            f"| layers | {c.n_layers} |",
            f"| hidden size | {c.d_model} |",
            f"| attention | {c.n_heads} query heads, {c.n_kv_heads} key/value heads (grouped-query), "
            f"head dim {c.head_dim} |",
            f"| MLP | SwiGLU, intermediate size {c.d_ff} |",
            f"| vocabulary | {c.vocab_size} (byte-level BPE) |",
            f"| context length | {c.max_seq_len} tokens |",
            f"| positions | RoPE, theta {c.rope_theta:g} |",
            f"| normalization | pre-norm RMSNorm, eps {c.norm_eps:g} |"]


def _card_usage(gpt, source: Path, out: Path) -> list[str]:
    gguf_name = f"{out.name}.gguf"
    lines = [] if gpt.tokenizer is not None else [
        "The source had no tokenizer embedded, so this directory has none: add the one the model was trained "
        "with before loading it.", ""]
    lines += ["With transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{out}")',
              f'model = AutoModelForCausalLM.from_pretrained("{out}")',
              'ids = tok("The history of the city", return_tensors="pt").input_ids',
              "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))"]
    if gpt.tokenizer is not None and gpt.tokenizer.chat_template:
        lines.append("# chat: tok.apply_chat_template(messages, add_generation_prompt=True) (ChatML template)")
    lines += ["```", "", "With llama.cpp, export a GGUF file from the same source with FishAI Train and run it:", "",
              "```bash",
              f"python quantize.py --model {source} --output {gguf_name} --format gguf --strategy mixed",
              f'llama-cli -m {gguf_name} -p "The history of the city" -n 40',
              "```", "",
              "llama.cpp gives exactly this tokenizer's token ids (tested with llama-cpp-python 0.3.36).", "",
              f'With FishAI Train itself: `model.load_model("{out}")`, or '
              f'`python generate.py --model {out} --prompt "The history of the city"`.']
    return lines


def model_card(gpt, source, out, dtype_label: str, record: dict | None) -> str:
    """README.md for the HF directory: what the model is (a LLaMA-style decoder and its numbers),
    how it was trained (from the checkpoint's record) and how to load it."""
    source, out = Path(source), Path(out)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [fishai, llama]", "---",
             "", f"# {out.name}", "",
             "A LLaMA-style decoder-only language model made with FishAI Train, exported by "
             f"`quantize.py --format hf` as a `LlamaForCausalLM` (from `{source.name}`).", "",
             "## Architecture", "", *_card_architecture(gpt, dtype_label), "",
             "## Training", "", *_card_training(source, record), "",
             "## How to use", "", *_card_usage(gpt, source, out), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp); the gguf package is imported only here

GGUF_FILE_TYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "int8": "MOSTLY_Q8_0", "int4": "MOSTLY_Q4_0",
                   "mixed": "MOSTLY_Q4_0"}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder Q/K rows from HF's rotate-halves RoPE layout to llama.cpp's interleaved pairs (the
    same permutation as llama.cpp's convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(name: str, config) -> int | None:
    """Heads of a Q/K projection (whose rows llama.cpp wants permuted), None for other tensors."""
    if name.endswith("attn.wq.weight"):
        return config.n_heads
    if name.endswith("attn.wk.weight"):
        return config.n_kv_heads
    return None


def gguf_plan(name: str, shape, strategy: str) -> tuple[str, str | None]:
    """(GGML type name, fallback note). Q8_0/Q4_0 use blocks of 32 along each row: rows whose
    length is not a multiple of 32 fall back to F16. 1-D norms stay F32 as in llama.cpp."""
    if len(shape) != 2 or strategy == "fp32":
        return "F32", None
    want = {"fp16": "F16", "int8": "Q8_0", "int4": "Q4_0"}.get(strategy)
    if want is None:                                # mixed
        q = plan_qtype(name, shape, "mixed")
        want = {"f16": "F16", "q8": "Q8_0", "q4": "Q4_0"}[q]
    if want != "F16" and shape[1] % 32:
        return "F16", f"row length {shape[1]} is not a multiple of 32"
    return want, None


def _gguf_metadata(writer, config, strategy: str) -> None:
    """The llama-architecture hyperparameters. RoPE: plain (no scaling) over the whole head with
    our rope_theta; llama.cpp's llama RoPE rotates interleaved pairs, hence the Q/K row permutation."""
    import gguf
    writer.add_name("FishAI")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, GGUF_FILE_TYPES[strategy])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# llama.cpp's name for GPT-2's pre-tokenizer regex, which is exactly what our tokenizer splits with
# (tokenizers' ByteLevel(use_regex=True)). "default" would split digits in threes and punctuation
# apart ("1892" -> "189" "2"), so llama.cpp users got other ids than training used.
GGUF_PRE_TOKENIZER = "gpt-2"


def _gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) in the form llama.cpp's "gpt2" (byte-level BPE) tokenizer reads:
    BPE pieces in their byte-level spelling as NORMAL; special added tokens as CONTROL (llama.cpp
    parses them only with parse_special, as our encode does only with allow_special); other added
    tokens as USER_DEFINED (always matched, in HF tokenizers too); the ids past the tokenizer's
    vocabulary (the model rounds it up to a multiple of 64) as UNUSED placeholders."""
    import gguf
    tj = json.loads(tokenizer.to_dict()["tokenizer_json"])
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for tok, i in tj["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = tok, int(gguf.TokenType.NORMAL)
    for t in tj.get("added_tokens", []):
        if t["id"] < vocab_size:
            tokens[t["id"]] = t["content"]
            types[t["id"]] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return tokens, types, merges


def _gguf_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp needs it to give exactly our ids, stop where we stop and render our
    chat template (tested against llama-cpp-python in tests/test_quantize.py)."""
    tokens, types, merges = _gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")             # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
        # <|endoftext|> separates the training documents, so it is also what may precede one
        # (GPT-2 style); without a BOS id llama.cpp would assume id 11
        writer.add_bos_token_id(tokenizer.eos_id)
    if tokenizer.im_end_id is not None:
        # end of a chat turn; llama.cpp would otherwise guess it from the token texts
        writer.add_eot_token_id(tokenizer.im_end_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)                 # we never add BOS or EOS to a text
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensor(name: str, w: torch.Tensor, config, strategy: str):
    """(data, raw_dtype for GGUFWriter.add_tensor, report row) of one parameter, quantized by the
    gguf package's reference code (Q/K rows permuted for llama.cpp's RoPE)."""
    import gguf
    w = w.detach().float().cpu()
    heads = _rope_heads(name, config)
    if heads:
        w = llama_cpp_permute(w, heads)
    tname, note = gguf_plan(name, tuple(w.shape), strategy)
    qtype = getattr(gguf.GGMLQuantizationType, tname)
    data = gguf.quants.quantize(np.ascontiguousarray(w.numpy()), qtype)
    deq = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32))
    row = {"name": name, "gguf_name": external_name(name, "gguf"), "qtype": tname, "fallback": note,
           "shape": list(w.shape), "params": w.numel(), "bytes": int(data.nbytes),
           "bits_per_weight": 8.0 * data.nbytes / w.numel(), **quant_error(w, deq)}
    return data, (None if tname in ("F32", "F16") else qtype), row


def export_gguf(gpt, out_path, strategy: str, progress: bool = True) -> list[dict]:
    """Write a llama-architecture GGUF (atomic: common.atomic_output). Returns per-tensor report rows."""
    import gguf
    rows = []
    with common.atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _gguf_metadata(writer, gpt.config, strategy)
        if gpt.tokenizer is not None:
            _gguf_tokenizer(writer, gpt.tokenizer, gpt.config.vocab_size)
        else:                                       # llama.cpp loads it for token-id input only
            writer.add_tokenizer_model("none")
        for name, w in tqdm(gpt.state_dict().items(), desc="gguf", unit="tensor", disable=not progress):
            data, raw_dtype, row = _gguf_tensor(name, w, gpt.config, strategy)
            writer.add_tensor(row["gguf_name"], data, raw_dtype=raw_dtype)
            rows.append(row)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return rows


def read_gguf_state(path, config) -> dict:
    """Read a GGUF written by export_gguf back into our parameter names (dequantized float32,
    Q/K rows un-permuted): {name: Tensor}. Uses the gguf package's reader."""
    import gguf
    by_name = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for name, shape in param_shapes(config).items():
        t = by_name[external_name(name, "gguf")]
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        heads = _rope_heads(name, config)
        out[name] = llama_cpp_unpermute(w, heads) if heads else w
    return out


# ----------------------------------------------------------------------------------------------
# CLI

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} GB"


def print_report(rows: list[dict], summary: dict, out=sys.stdout) -> None:
    print(f"{'tensor':<28}{'type':>6}{'method':>7}{'shape':>14}{'bytes':>11}{'bits/w':>8}"
          f"{'max|err|':>11}{'mean|err|':>11}{'rel':>9}", file=out)
    for r in rows:
        print(f"{r['name']:<28}{r['qtype']:>6}{r.get('method', '-'):>7}{'x'.join(map(str, r['shape'])):>14}"
              f"{r['bytes']:>11,}{r['bits_per_weight']:>8.2f}{r['max_abs_err']:>11.2e}"
              f"{r['mean_abs_err']:>11.2e}{r['rel_err']:>9.2%}"
              + (f"  (fallback: {r['fallback']})" if r.get("fallback") else ""), file=out)
    s = summary
    print(f"total: {s['params']:,} params, file {_fmt_bytes(s['file_bytes'])} "
          f"vs FP32 {_fmt_bytes(s['fp32_bytes'])} ({s['compression_vs_fp32']:.2f}x smaller) "
          f"and FP16 {_fmt_bytes(s['fp16_bytes'])} ({s['compression_vs_fp16']:.2f}x); "
          f"{s['bits_per_weight']:.2f} bits/weight", file=out)
    if "source_file_bytes" in s:
        print(f"source checkpoint file: {_fmt_bytes(s['source_file_bytes'])} "
              f"({s['compression_vs_source_file']:.2f}x the export)", file=out)


SUFFIX = {"bin": ".bin", "gguf": ".gguf"}  # a file is named for what it is: model loaders sniff bytes, people read names


def _plan_output(args) -> tuple[str, str, Path]:
    """(format, strategy, output path) of a run, with every flag combination checked before any work."""
    fmt = args.format
    strategy = args.strategy or ("fp16" if fmt == "hf" else "mixed")
    out = Path(args.output or {"bin": f"fishai-{strategy}.bin", "gguf": f"fishai-{strategy}.gguf"}.get(fmt, "fishai-hf"))
    if fmt == "hf" and strategy not in ("fp16", "fp32"):
        raise QuantizeError(f"--format hf stores plain fp16/fp32 weights (got --strategy {strategy}); "
                            "use --format bin or gguf for int8/int4/mixed")
    if args.calibration_data and fmt != "bin":
        raise QuantizeError("--calibration-data applies to --format bin (GGUF uses llama.cpp's own Q8_0/Q4_0 rounding)")
    if fmt in SUFFIX and out.suffix != SUFFIX[fmt] and not out.is_dir():
        raise QuantizeError(f"--output {out}: a --format {fmt} file is named *{SUFFIX[fmt]} (e.g. "
                            f"{out.with_suffix(SUFFIX[fmt])}), so that it is not taken for another kind of file")
    return fmt, strategy, out


def output_plan(args) -> tuple[list, list]:
    """What export writes (--output, --json) and reads (--model, --calibration-data, --eval-data)."""
    fmt, _, out = _plan_output(args)
    target = (common.Output(out, "--output", "hf_model", owns=is_hf_output, whole=True) if fmt == "hf"
              else common.Output(out, "--output", {"bin": "quantized", "gguf": "gguf"}[fmt]))
    return ([target, common.Output(args.json, "--json", "json")],
            [("--model", args.model), ("--calibration-data", args.calibration_data), ("--eval-data", args.eval_data)])


def _calibration(gpt, args) -> tuple[list | None, dict | None]:
    """GPTQ calibration batches and their report entry (None, None without --calibration-data)."""
    if not args.calibration_data:
        return None, None
    max_len = gpt.config.max_seq_len
    seq_len = args.calibration_seq_len or min(512, max_len)
    if seq_len > max_len:
        raise QuantizeError(f"--calibration-seq-len {seq_len} is longer than the model's context ({max_len})")
    batches = calibration_batches(gpt.tokenizer, args.calibration_data, args.calibration_samples, seq_len,
                                  seed=args.seed, show_progress=not args.quiet)
    return batches, {"data": args.calibration_data, "samples": sum(len(b) for b in batches),
                     "seq_len": seq_len, "damp": args.damp, "method": "gptq"}


def _export_bin(gpt, args, strategy: str, out: Path, report: dict) -> tuple[list[dict], int]:
    calib, report["calibration"] = _calibration(gpt, args)
    tensors, rows = quantize_model(gpt, strategy, args.group_size, calib, args.damp, not args.quiet)
    tok = gpt.tokenizer.to_dict() if gpt.tokenizer is not None else None
    meta = {"strategy": strategy, "group_size": args.group_size, "calibration": report["calibration"],
            "source": Path(args.model).name, "stage": gpt.stage, "created_by": "quantize.py"}
    return rows, write_quantized(out, tensors, gpt.config.to_dict(), tok, meta=meta)


def _export_gguf(gpt, args, strategy: str, out: Path, report: dict) -> tuple[list[dict], int]:
    rows = export_gguf(gpt, out, strategy, not args.quiet)
    report["gguf_fallbacks"] = {r["name"]: r["fallback"] for r in rows if r.get("fallback")}
    return rows, out.stat().st_size


def _export_hf(gpt, args, strategy: str, out: Path, report: dict) -> tuple[list[dict], int]:
    dtype, qtype, bits = (torch.float16, "f16", 16) if strategy == "fp16" else (torch.float32, "f32", 32)
    rows = [{"name": n, "qtype": qtype, "method": "-", "shape": list(w.shape), "params": w.numel(),
             "bytes": w.numel() * bits // 8, "bits_per_weight": float(bits), **quant_error(w, w.to(dtype))}
            for n, w in gpt.state_dict().items()]
    src = Path(args.model)
    card = model_card(gpt, src, out, "FP16" if bits == 16 else "FP32", training_record(src))
    save_hf(gpt.to(dtype), out, tokenizer=gpt.tokenizer, overwrite=args.overwrite, model_card=card)
    return rows, sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


_EXPORTS = {"bin": _export_bin, "gguf": _export_gguf, "hf": _export_hf}


def _perplexity_report(src: Path, out: Path, fmt: str, texts: list[str], args) -> dict:
    if fmt == "gguf":
        return {"note": "not measured for gguf (llama.cpp formats); export --format bin to measure"}
    before = eval_perplexity(src, texts, args.eval_batch_size, not args.quiet)
    after = eval_perplexity(out, texts, args.eval_batch_size, not args.quiet)
    return {"data": args.eval_data, "documents": len(texts), "before": before, "after": after,
            "relative_change": ppl_delta(before, after)}


def export(args) -> dict:
    """The CLI as a function: export and return the report dict (raises a FishAIError on bad input)."""
    common.check_plan(*output_plan(args), args.overwrite)
    fmt, strategy, out = _plan_output(args)
    src = Path(args.model)
    gpt = load_model(src, device="cpu", dtype=torch.float32, dequantize=True)  # a .bin source too
    eval_texts = load_eval_texts(args.eval_data, args.limit) if args.eval_data else None
    report = {"source": str(src), "output": str(out), "format": fmt, "strategy": strategy,
              "group_size": args.group_size, "model_config": gpt.config.to_dict(),
              "date": time.strftime("%Y-%m-%d"), "calibration": None, "source_quantized": None}
    if gpt.quantized_from:
        report["source_quantized"] = gpt.quantized_from
        print(f"warning: {src} is already quantized ({report['source_quantized']}): the export starts from its "
              f"dequantized weights, and every error below is measured against those, not against the original "
              f"float weights (quantize the .pt checkpoint for that)", file=sys.stderr)
    t0 = time.time()
    rows, size = _EXPORTS[fmt](gpt, args, strategy, out, report)
    report["seconds"] = time.time() - t0
    report["summary"] = size_summary(rows, size, src.stat().st_size if src.is_file() else None)
    report["tensors"] = rows
    if eval_texts is not None:
        report["perplexity"] = _perplexity_report(src, out, fmt, eval_texts, args)
    return report


def export_command(args) -> None:
    report = export(args)
    s = report["summary"]
    if args.quiet:
        print(f"wrote {report['output']}: {_fmt_bytes(s['file_bytes'])}, {s['compression_vs_fp32']:.2f}x smaller "
              f"than FP32, {s['bits_per_weight']:.2f} bits/weight")
    else:
        print_report(report["tensors"], s)
    if "before" in report.get("perplexity", {}):
        print(format_perplexity(report["perplexity"]))
    common.write_outputs(args, report, say=False)


def main(argv=None) -> int:
    return common.run_cli(export_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
