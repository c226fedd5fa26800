"""Benchmark a FishAI model: self-test (correctness + speed vs transformers), perplexity, generation quality.

The scoring functions here (`load_lm`, `LM`, `loglikelihood`, `perplexity`) are the ONE code path used
by benchmark.py, reference_benchmark.py and evaluate.py, so every model (FishAI or any transformers
causal LM) is scored the same way.

Usage:
    # does the model build, train and decode correctly on this machine, and how fast vs transformers?
    python benchmark.py self-test --config tiny --device cpu
    python benchmark.py self-test --config small --device cuda --dtype bf16 --compile --json st.json
    python benchmark.py self-test --config small --device cpu --threads 1 --clock cpu   # steady on a busy CPU

    # perplexity (WikiText-103 / WikiText-2 / PTB test from the HF hub, or local files) + generation quality
    python benchmark.py full --model checkpoints/fishai-best.pt --device cuda
    python benchmark.py full --model checkpoints/fishai-best.pt \
        --wikitext103 ../shared/data/wikitext103/wiki.test.tokens --ptb ../shared/data/ptb/ptb.valid.txt \
        --json results.json --report report.md
    python benchmark.py full --model fishai-int4.bin --data mytext=notes.txt --stride 512 --limit 20

Scoring conventions (lm-evaluation-harness "loglikelihood_rolling"):
- Every document is scored token by token, starting with its FIRST token, conditioned on a single
  "begin" token: the tokenizer's BOS when the model has one, otherwise its EOS (FishAI, GPT-2 and
  Pythia use <|endoftext|>; FishAI training data separates documents with EOS, so for FishAI this is
  exactly the context the model saw before every training document).
- Long documents are cut into windows of the model's context length. --stride (default = context
  length) is how many new tokens each window predicts: stride = context gives disjoint windows (each
  window conditions on the one token before it; lm-evaluation-harness' default and what the seed's
  figures use); a smaller stride gives every token up to (context - stride) tokens of extra context
  and a lower perplexity, at (context / stride) times the compute.
- word_ppl = exp(-sum logprob / words) and bits_per_byte = -sum logprob / bytes / ln 2 with
  words = len(re.split(r"\\s+", text)) and bytes = len(text.encode("utf-8")) on the original text,
  so models with different tokenizers compare fairly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data_utils as du
from data_utils import atomic_write_text, hub_reachable

try:  # tqdm is a hard dependency of the project, but keep the scoring core importable without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


class BenchmarkError(ValueError):
    """Bad input for a benchmark (model spec, flag, dataset); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# dtype / device helpers

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype | None:
    """None / torch.dtype / name ("bf16", "float16", ...) -> torch.dtype or None (model default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key in ("", "auto", "none"):
        return None
    if key not in _DTYPES:
        raise BenchmarkError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16")
    return _DTYPES[key]


def resolve_device(device: str | None) -> str:
    """'auto' -> cuda when available else cpu; refuse cuda when there is none (clear message)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return str(device)


# ----------------------------------------------------------------------------------------------
# one interface over a FishAI GPT and any transformers causal LM

class LM:
    """A causal LM to score: FishAI GPT (model.load_model) or a transformers AutoModelForCausalLM.

    encode() never adds special tokens; the scoring functions add the begin token (`begin_id`: BOS
    when the tokenizer has one, else EOS) themselves, identically for every model.
    """

    def __init__(self, model, tokenizer, *, kind: str, name: str, device: str, max_seq_len: int,
                 eos_id: int | None, vocab_size: int, begin_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind                  # "fishai" or "hf"
        self.name = name
        self.device = device
        self.max_seq_len = int(max_seq_len)
        self.eos_id = eos_id
        self.vocab_size = int(vocab_size)
        self.begin_id = begin_id if begin_id is not None else (eos_id if eos_id is not None else 0)

    def __repr__(self):
        return (f"LM(name={self.name!r}, kind={self.kind}, device={self.device}, "
                f"max_seq_len={self.max_seq_len}, vocab_size={self.vocab_size})")

    # -- tokenizer
    def encode(self, text: str) -> list[int]:
        if self.kind == "fishai":
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "fishai":
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- scoring
    @torch.inference_mode()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) float32 next-token logits (no grad)."""
        idx = idx.to(self.device)
        if self.kind == "fishai":
            out, _ = self.model(idx)
        else:
            out = self.model(input_ids=idx).logits
        return out.float()

    # -- generation
    @torch.inference_mode()
    def generate_ids(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None,
                     top_p=None, stop=None, seed=None) -> tuple[list[int], bool]:
        """Continue one prompt. Returns (new token ids without EOS, ended_with_eos).

        Stops at EOS, after max_new_tokens, or as soon as the decoded text contains one of `stop`
        (the text is cut there by generate())."""
        prompt = [int(t) for t in prompt_ids] or [self.begin_id]
        # keep the newest context when the prompt + new tokens do not fit the context window
        keep = max(1, self.max_seq_len - max_new_tokens)
        prompt = prompt[-keep:]
        max_new_tokens = max(0, min(max_new_tokens, self.max_seq_len - len(prompt)))
        if max_new_tokens == 0:
            return [], False
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        stop = [s for s in (stop or []) if s]
        new: list[int] = []
        ended = False
        if self.kind == "fishai":
            gen = None
            if seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(int(seed))
            stream = self.model.generate_stream(idx, max_new_tokens, temperature=temperature,
                                                top_k=top_k, top_p=top_p, eos_id=self.eos_id,
                                                generator=gen)
            for tok in stream:
                t = int(tok.view(-1)[0])
                if self.eos_id is not None and t == self.eos_id:
                    ended = True
                    break
                new.append(t)
                if stop and any(s in self.decode(new) for s in stop):
                    break
            if hasattr(stream, "close"):
                stream.close()
        else:
            from transformers import StoppingCriteria, StoppingCriteriaList

            lm = self

            class _StopOnStrings(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    text = lm.decode(input_ids[0, idx.shape[1]:].tolist())
                    return torch.full((input_ids.shape[0],), any(s in text for s in stop),
                                      dtype=torch.bool, device=input_ids.device)

            if seed is not None:
                torch.manual_seed(int(seed))
            kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(idx),
                          pad_token_id=self.eos_id if self.eos_id is not None else 0)
            if self.eos_id is not None:
                kwargs["eos_token_id"] = self.eos_id
            if temperature and temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature),
                              top_k=top_k if top_k else 0, top_p=top_p if top_p else 1.0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            if stop:
                kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings()])
            out = self.model.generate(idx, **kwargs)[0, idx.shape[1]:].tolist()
            for t in out:
                if self.eos_id is not None and t == self.eos_id:
                    ended = True
                    break
                new.append(int(t))
        return new, ended

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None,
                 top_p=None, stop=None, seed=None) -> str:
        """Continue one prompt and return the new text (cut before the first stop string, no EOS)."""
        new, _ = self.generate_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, stop, seed)
        text = self.decode(new)
        for s in stop or []:
            if s and s in text:
                text = text[: text.index(s)]
        return text


def _hf_dir_model_type(path: Path) -> str | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _looks_like_path(spec: str) -> bool:
    """Hub names are 'name' or 'org/name'; anything else that does not exist is a mistyped path."""
    return (Path(spec).suffix in (".pt", ".bin", ".safetensors", ".json") or spec.startswith((".", "/", "~"))
            or spec.count("/") > 1 or "\\" in spec)


def _load_transformers(spec: str, device: str, dtype, max_seq_len: int | None) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(spec).exists()
    if not local and _looks_like_path(spec):
        raise BenchmarkError(f"{spec}: no such file or directory; pass a model directory saved with "
                             "save_pretrained, or a hub name (org/name)")
    if local and not Path(spec).is_dir():
        raise BenchmarkError(f"{spec}: a transformers model must be a directory (config.json + weights) "
                             "or a hub name")
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if local:
            tok = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
        else:
            try:  # hub name: the local cache first, so a cached model works offline
                tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **kwargs)
            except OSError:
                if not hub_reachable():
                    raise BenchmarkError(
                        f"cannot load {spec!r}: it is not in the local Hugging Face cache and the hub "
                        "is unreachable (offline); download it on a connected machine or pass a local "
                        "model directory") from None
                tok = AutoTokenizer.from_pretrained(spec)
                model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except BenchmarkError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchmarkError(f"cannot load transformers model {spec!r}: {first}") from None
    model.to(device).eval()
    cfg = model.config
    if max_seq_len is None:
        # lm-evaluation-harness' rule: the model's own context length attribute, else the tokenizer's
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if getattr(cfg, attr, None):
                max_seq_len = int(getattr(cfg, attr))
                break
        else:
            tml = getattr(tok, "model_max_length", None)
            max_seq_len = int(tml) if tml and tml < 1_000_000 else 2048
    eos = tok.eos_token_id
    if eos is None:
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
    begin = tok.bos_token_id if tok.bos_token_id is not None else eos
    vocab = getattr(cfg, "vocab_size", None) or len(tok)
    return LM(model, tok, kind="hf", name=spec, device=device, max_seq_len=max_seq_len, eos_id=eos,
              vocab_size=vocab, begin_id=begin)


def _load_fishai(spec: str, device: str, dtype, max_seq_len: int | None) -> LM:
    from model import CheckpointError, load_model

    try:
        model = load_model(spec, device=device, dtype=dtype)
    except (CheckpointError, FileNotFoundError) as e:
        raise BenchmarkError(str(e).strip().splitlines()[0]) from None
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise BenchmarkError(f"{spec}: the model has no tokenizer attached; save the checkpoint with its "
                             "tokenizer (train.py does) or use an HF directory with tokenizer files")
    model.eval()
    ctx = model.config.max_seq_len if max_seq_len is None else min(max_seq_len, model.config.max_seq_len)
    eos = getattr(tok, "eos_id", None)
    return LM(model, tok, kind="fishai", name=str(spec), device=device, max_seq_len=ctx, eos_id=eos,
              vocab_size=model.config.vocab_size, begin_id=eos)


def load_lm(spec, device: str = "cpu", dtype=None, hf: bool = False, max_seq_len: int | None = None) -> LM:
    """Load something to score.

    spec: a FishAI checkpoint (.pt), a quantized export (.bin), a FishAI/Llama HF directory (loaded by
    model.load_model as a FishAI GPT), or with hf=True any transformers causal-LM directory or hub
    name. A directory whose config.json is not a Llama model is loaded through transformers even
    without hf=True. Never uses trust_remote_code. max_seq_len caps the context window (default: the
    model's own). Raises BenchmarkError with a one-line message when it cannot load.
    """
    device = resolve_device(device)
    dtype = parse_dtype(dtype)
    spec = str(spec)
    path = Path(spec)
    if hf:
        return _load_transformers(spec, device, dtype, max_seq_len)
    if path.is_dir():
        mtype = _hf_dir_model_type(path)
        if mtype is None:
            raise BenchmarkError(f"{spec}: directory has no config.json; pass a checkpoint (.pt), a "
                                 "quantized .bin, or a model directory saved with save_pretrained")
        if mtype != "llama":
            return _load_transformers(spec, device, dtype, max_seq_len)
        try:
            return _load_fishai(spec, device, dtype, max_seq_len)
        except BenchmarkError as e:
            # a Llama the FishAI GPT cannot represent (untied head, biases, RoPE scaling): transformers
            try:
                return _load_transformers(spec, device, dtype, max_seq_len)
            except BenchmarkError:
                raise e from None
    if path.is_file():
        return _load_fishai(spec, device, dtype, max_seq_len)
    if _looks_like_path(spec):
        raise BenchmarkError(f"{spec}: no such file or directory; pass a checkpoint (.pt), a quantized "
                             ".bin, a model directory or a hub name (org/name)")
    # not a local path: a hub name ("gpt2", "EleutherAI/pythia-70m")
    return _load_transformers(spec, device, dtype, max_seq_len)


# ----------------------------------------------------------------------------------------------
# scoring

def loglikelihood(lm: LM, requests, batch_size: int = 8, progress: bool = True) -> list[tuple[float, bool]]:
    """Score continuations: for each (context_ids, continuation_ids) -> (sum log p(cont | ctx), is_greedy).

    Requests are batched longest first (right-padded; causal attention makes the padding invisible),
    the context is truncated from the left so context + continuation fits lm.max_seq_len (+1 for the
    shift), an empty context becomes the begin token, and results come back in the original order.
    is_greedy: every continuation token is the argmax of its predicted distribution.
    """
    L = lm.max_seq_len
    prepared = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not cont:
            raise ValueError(f"loglikelihood request {i} has an empty continuation")
        if len(cont) > L:
            raise ValueError(f"loglikelihood request {i}: continuation of {len(cont)} tokens is longer "
                             f"than the model's context ({L})")
        if not ctx:
            ctx = [lm.begin_id]
        full = (ctx + cont)[-(L + 1):]
        inp = full[:-1]
        prepared.append((i, inp, cont))
    prepared.sort(key=lambda r: (-len(r[1]), r[0]))
    results: list = [None] * len(prepared)
    total = sum(len(r[2]) for r in prepared)
    bar = None
    if progress and tqdm is not None and prepared:
        bar = tqdm(total=total, unit="tok", desc=f"scoring {lm.name}"[:60], leave=False, dynamic_ncols=True)
    # cap the (B, T, V) float32 logits of one forward (e.g. SmolLM2: 8192 x 49152 = 1.6 GB per row)
    budget = 2 * 2**30
    start = 0
    while start < len(prepared):
        T = len(prepared[start][1])  # longest first: the first row of a chunk is its longest
        bs = max(1, min(int(batch_size), budget // max(1, T * lm.vocab_size * 4)))
        chunk = prepared[start:start + bs]
        start += len(chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, (_, inp, _) in enumerate(chunk):
            idx[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = lm.logits(idx)
        for b, (i, inp, cont) in enumerate(chunk):
            n = len(cont)
            # the logits at inp positions [len-n, len) predict the n continuation tokens
            row = logits[b, len(inp) - n:len(inp)]
            logp = F.log_softmax(row, dim=-1)
            tgt = torch.tensor(cont, dtype=torch.long, device=logp.device)
            lp = logp.gather(-1, tgt[:, None]).squeeze(-1)
            greedy = bool((row.argmax(-1) == tgt).all())
            results[i] = (float(lp.double().sum()), greedy)
        del logits
        if bar is not None:
            bar.update(sum(len(r[2]) for r in chunk))
    if bar is not None:
        bar.close()
    return results


def rolling_windows(tokens: list[int], begin_id: int, max_seq_len: int, stride: int | None = None):
    """Yield (context, continuation) requests that score every token of `tokens` exactly once.

    The first window predicts the first min(max_seq_len, n) tokens from [begin_id]; each later window
    predicts the next `stride` tokens conditioned on the max_seq_len tokens before its last target
    (so stride = max_seq_len means disjoint windows, as lm-evaluation-harness' rolling windows).
    """
    L = int(max_seq_len)
    stride = L if stride is None else int(stride)
    if not 1 <= stride <= L:
        raise ValueError(f"stride must be between 1 and the context length {L}, got {stride}")
    n = len(tokens)
    if n == 0:
        return
    first = min(L, n)
    yield [begin_id], tokens[:first]
    predicted = first
    while predicted < n:
        k = min(n - predicted, stride)
        end = predicted + k
        yield tokens[end - L - 1:end - k], tokens[end - k:end]
        predicted = end


def count_words(text: str) -> int:
    """Word count as lm-evaluation-harness (`len(re.split(r"\\s+", doc))`)."""
    return len(re.split(r"\s+", text))


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def perplexity(lm: LM, texts, stride: int | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """Rolling log-likelihood of each document -> token_ppl, word_ppl, bits_per_byte, tokens, words, bytes.

    stride: new tokens predicted per window (default: lm.max_seq_len, disjoint windows); smaller
    strides give each token up to max_seq_len - stride tokens of extra context. Documents that
    tokenize to nothing (empty strings) are skipped entirely. Word and byte counts come from the
    original text, so results of models with different tokenizers are comparable.
    """
    if isinstance(texts, str):
        texts = [texts]
    stride = lm.max_seq_len if stride is None else int(stride)
    if not 1 <= stride <= lm.max_seq_len:
        raise ValueError(f"stride must be between 1 and the context length {lm.max_seq_len}, got {stride}")
    requests = []
    n_tokens = n_words = n_bytes = n_docs = 0
    for text in texts:
        ids = lm.encode(text)
        if not ids:
            continue
        n_docs += 1
        n_tokens += len(ids)
        n_words += count_words(text)
        n_bytes += len(text.encode("utf-8"))
        requests.extend(rolling_windows(ids, lm.begin_id, lm.max_seq_len, stride))
    if n_tokens == 0:
        raise ValueError("perplexity: no tokens to score (all documents are empty)")
    t0 = time.perf_counter()
    scores = loglikelihood(lm, requests, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    nll = -sum(s for s, _ in scores)
    return {
        "token_ppl": _safe_exp(nll / n_tokens),
        "word_ppl": _safe_exp(nll / n_words),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "tokens": n_tokens,
        "words": n_words,
        "bytes": n_bytes,
        "nll": nll,
        "documents": n_docs,
        "windows": len(requests),
        "stride": stride,
        "max_seq_len": lm.max_seq_len,
        "seconds": round(seconds, 3),
    }


# ----------------------------------------------------------------------------------------------
# `full`: perplexity on the standard datasets + generation quality

DEFAULT_DATASETS = ("wikitext103", "wikitext2", "ptb")
DATASET_LABELS = {"wikitext103": "WikiText-103", "wikitext2": "WikiText-2", "ptb": "PTB"}

# fixed prompts: the same for every model and run, so generation numbers compare across checkpoints
GEN_PROMPTS = [
    "The history of the city began",
    "In computer science, a hash table is",
    "Once upon a time, there was a little girl who",
    "The most important thing to remember about cooking rice is",
    "Scientists have discovered that",
    "从前有一座山，山里有一座庙，",
    "人工智能是",
    "今天的天气很好，我们",
]


def truncate_docs(docs: list[str], max_chars: int) -> list[str]:
    """Keep documents until max_chars characters; the last one is cut at a line boundary."""
    out, total = [], 0
    for d in docs:
        if total + len(d) <= max_chars:
            out.append(d)
            total += len(d)
            continue
        room = max_chars - total
        cut = d[:room]
        if "\n" in cut:
            cut = cut[: cut.rindex("\n") + 1]
        if cut.strip():
            out.append(cut)
        break
    return out


def load_datasets(specs, split: str = "test", limit: int | None = None, errors=None,
                  max_chars: int | None = None, detokenize: bool = False) -> dict:
    """[(name, path_or_None), ...] -> {name: [documents]} through data_utils.load_eval_texts.

    Known names (wikitext103, wikitext2, ptb) get their dataset-specific reader; other names read
    the file as plain text. A dataset that cannot be loaded is reported in `errors` (name -> message)
    and skipped, so one offline dataset does not stop the others. limit: first N documents only;
    max_chars: at most that many characters per dataset (for quick runs; PTB is one document).
    detokenize: undo WikiText's tokenization (" @-@ ", " , ") as the GPT-2 paper did.
    """
    from data_utils import load_eval_texts

    out = {}
    for name, path in specs:
        kind = name if name in DEFAULT_DATASETS else "text"
        if kind == "text" and path is None:
            msg = f"{name}: unknown dataset name without a path; use --data {name}=PATH"
        else:
            try:
                docs = load_eval_texts(kind, path, split=split, detokenize=detokenize)
                docs = [d for d in docs if d and d.strip()]
                if limit:
                    docs = docs[:limit]
                if max_chars:
                    docs = truncate_docs(docs, max_chars)
                if not docs:
                    raise ValueError(f"{path or name}: no text found")
                out[name] = docs
                continue
            except (ValueError, OSError) as e:  # DataError is a ValueError
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if not msg.startswith(name):
                    msg = f"{name}: {msg}"
        if errors is None:
            raise BenchmarkError(msg)
        errors[name] = msg
    return out


def distinct_n(samples: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over the samples (Li et al., 2016)."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sample: list[int], n: int = 4) -> float:
    """Share of a sample's n-grams that repeat an earlier n-gram of the same sample (seq-rep-n)."""
    grams = [tuple(sample[i:i + n]) for i in range(len(sample) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def generation_quality(lm: LM, prompts=None, samples_per_prompt: int = 2, max_new_tokens: int = 64,
                       temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                       seed: int = 1234, progress: bool = True) -> dict:
    """Sample each fixed prompt at a fixed seed and measure diversity / degeneration.

    distinct-1/2 on the model's tokens pooled over all samples; repetition_rate = mean seq-rep-4;
    mean_length in new tokens; eos_rate = share of samples that ended with EOS."""
    prompts = list(GEN_PROMPTS if prompts is None else prompts)
    rows, token_samples = [], []
    jobs = [(p, k) for p in prompts for k in range(samples_per_prompt)]
    it = jobs
    if progress and tqdm is not None:
        it = tqdm(jobs, desc="generating", unit="sample", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for i, (prompt, k) in enumerate(it):
        ids, ended = lm.generate_ids(lm.encode(prompt), max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed + i)
        token_samples.append(ids)
        rows.append({"prompt": prompt, "sample": k, "text": lm.decode(ids), "tokens": len(ids),
                     "ended_with_eos": ended})
    seconds = time.perf_counter() - t0
    n = max(1, len(rows))
    return {
        "distinct_1": distinct_n(token_samples, 1),
        "distinct_2": distinct_n(token_samples, 2),
        "repetition_rate": sum(repetition_rate(s) for s in token_samples) / n,
        "mean_length": sum(len(s) for s in token_samples) / n,
        "eos_rate": sum(r["ended_with_eos"] for r in rows) / n,
        "n": len(rows),
        "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                     "top_p": top_p, "seed": seed, "samples_per_prompt": samples_per_prompt},
        "seconds": round(seconds, 3),
        "samples": rows,
    }


def fmt_ppl(v) -> str:
    """Perplexity for tables: 2 decimals, scientific notation for untrained-model sizes."""
    if v is None:
        return "n/a"
    return f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def format_ppl_table(results: dict, title: str | None = None) -> str:
    """{dataset: perplexity() dict} -> a fixed-width terminal table."""
    lines = [title] if title else []
    lines.append(f"{'dataset':<14}{'token ppl':>11}{'word ppl':>11}{'bits/byte':>10}{'tokens':>10}"
                 f"{'words':>10}{'bytes':>11}{'sec':>8}")
    for name, r in results.items():
        lines.append(f"{DATASET_LABELS.get(name, name):<14}{fmt_ppl(r['token_ppl']):>11}{fmt_ppl(r['word_ppl']):>11}"
                     f"{r['bits_per_byte']:>10.4f}{r['tokens']:>10,}{r['words']:>10,}{r['bytes']:>11,}"
                     f"{r.get('seconds', 0):>8.1f}")
    return "\n".join(lines)


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def full_report_markdown(res: dict) -> str:
    """The `full` results as a markdown report."""
    s = res["settings"]
    out = [f"# FishAI benchmark: {res['model']}", "",
           f"- date: {res['date']}; device: {s['device']}; dtype: {s['dtype'] or 'model default'}",
           f"- context: {s['max_seq_len']} tokens; stride: {s['stride']} "
           f"({'disjoint windows' if s['stride'] == s['max_seq_len'] else 'overlapping windows'}); "
           f"begin token id {s['begin_id']}", ""]
    if res["perplexity"]:
        out += ["## Perplexity", "", "| dataset | token PPL | word PPL | bits/byte | tokens | words | bytes |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in res["perplexity"].items():
            out.append(f"| {DATASET_LABELS.get(name, name)} | {fmt_ppl(r['token_ppl'])} | {fmt_ppl(r['word_ppl'])} | "
                       f"{r['bits_per_byte']:.4f} | {r['tokens']:,} | {r['words']:,} | {r['bytes']:,} |")
        out.append("")
    for name, msg in res.get("errors", {}).items():
        out.append(f"- {name}: not scored: {msg}")
    g = res.get("generation")
    if g:
        st = g["settings"]
        out += ["", "## Generation quality", "",
                f"{g['n']} samples ({st['samples_per_prompt']} per prompt), {st['max_new_tokens']} new tokens max, "
                f"temperature {st['temperature']}, top-k {st['top_k']}, seed {st['seed']}.", "",
                "| distinct-1 | distinct-2 | repetition (seq-rep-4) | mean length | ends with EOS |",
                "|---:|---:|---:|---:|---:|",
                f"| {g['distinct_1']:.3f} | {g['distinct_2']:.3f} | {g['repetition_rate']:.3f} | "
                f"{g['mean_length']:.1f} | {g['eos_rate']:.0%} |", "", "### Samples", ""]
        for r in g["samples"]:
            text = r["text"].replace("\n", " ").strip()
            out.append(f"- **{r['prompt']}** → {text}{' ⟨EOS⟩' if r['ended_with_eos'] else ''}")
    return "\n".join(out) + "\n"


def parse_data_flags(args) -> list[tuple[str, str | None]]:
    """--wikitext103/--wikitext2/--ptb/--data name=path -> [(name, path)]; none -> the HF defaults."""
    specs = []
    for name in DEFAULT_DATASETS:
        p = getattr(args, name, None)
        if p:
            specs.append((name, p))
    for item in args.data or []:
        if "=" not in item:
            raise BenchmarkError(f"--data {item!r}: expected NAME=PATH (e.g. --data mytext=notes.txt)")
        name, path = item.split("=", 1)
        if not name or not path:
            raise BenchmarkError(f"--data {item!r}: expected NAME=PATH (e.g. --data mytext=notes.txt)")
        specs.append((name, path))
    if not specs:  # nothing local given: the standard test sets from the HF hub
        specs = [(name, None) for name in DEFAULT_DATASETS]
    for name, path in specs:
        if path is not None and not Path(path).exists():
            raise BenchmarkError(f"{path}: no such file (given for dataset {name})")
    return specs


def run_full(args) -> int:
    specs = parse_data_flags(args)
    for flag in ("json", "report"):
        p = getattr(args, flag)
        if p and Path(p).exists() and not args.overwrite:
            raise BenchmarkError(f"--{flag} {p}: file exists; pass --overwrite to replace it")
    lm = load_lm(args.model, device=args.device, dtype=args.dtype, hf=args.hf, max_seq_len=args.max_seq_len)
    stride = args.stride or lm.max_seq_len
    if not 1 <= stride <= lm.max_seq_len:
        raise BenchmarkError(f"--stride {stride}: must be between 1 and the context length {lm.max_seq_len}")
    print(f"model: {lm.name} ({lm.kind}, context {lm.max_seq_len}, vocab {lm.vocab_size}) on {lm.device}")
    errors: dict = {}
    datasets = load_datasets(specs, split=args.split, limit=args.limit, errors=errors,
                             max_chars=args.max_chars, detokenize=args.detokenize)
    for msg in errors.values():
        print(f"error: {msg}", file=sys.stderr)
    results = {}
    for name, docs in datasets.items():
        results[name] = perplexity(lm, docs, stride=stride, batch_size=args.batch_size,
                                   progress=not args.no_progress)
        r = results[name]
        print(f"{DATASET_LABELS.get(name, name)}: token ppl {r['token_ppl']:.2f}, word ppl {r['word_ppl']:.2f}, "
              f"bits/byte {r['bits_per_byte']:.4f} ({r['tokens']:,} tokens, {r['seconds']:.1f}s)")
    gen = None
    if not args.no_generation:
        gen = generation_quality(lm, samples_per_prompt=args.samples, max_new_tokens=args.gen_tokens,
                                 temperature=args.temperature, top_k=args.top_k or None, seed=args.seed,
                                 progress=not args.no_progress)
    res = {
        "model": str(args.model),
        "kind": lm.kind,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"device": lm.device, "dtype": args.dtype, "max_seq_len": lm.max_seq_len, "stride": stride,
                     "batch_size": args.batch_size, "split": args.split, "limit": args.limit,
                     "max_chars": args.max_chars, "detokenize": args.detokenize,
                     "begin_id": lm.begin_id, "datasets": {n: p for n, p in specs}},
        "perplexity": results,
        "errors": errors,
        "generation": gen,
    }
    print()
    if results:
        print(format_ppl_table(results, title=f"perplexity (stride {stride}, context {lm.max_seq_len})"))
    if gen:
        print(f"\ngeneration ({gen['n']} samples): distinct-1 {gen['distinct_1']:.3f}  distinct-2 "
              f"{gen['distinct_2']:.3f}  repetition {gen['repetition_rate']:.3f}  mean length "
              f"{gen['mean_length']:.1f}  ends with EOS {gen['eos_rate']:.0%}")
        for r in gen["samples"][:: max(1, args.samples)][:4]:
            print(f"  {r['prompt']!r} -> {r['text'][:100]!r}")
    write_outputs(args, res, full_report_markdown)
    return 1 if errors else 0


# ----------------------------------------------------------------------------------------------
# `self-test`: correctness checks + speed side by side with transformers.LlamaForCausalLM

def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of a phase: CUDA max_memory_allocated, or on CPU the process' peak RSS (VmHWM,
    reset through /proc/self/clear_refs). Returns bytes, or None when it cannot be measured."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import resource
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):
            return None


def _autocast(device, dtype):
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    if dtype is None or dtype == torch.float32:
        return torch.autocast(dev, enabled=False)
    return torch.autocast(dev, dtype=dtype)


def _check(checks, name, passed, detail, required=True):
    checks.append({"name": name, "passed": bool(passed), "detail": detail, "required": required})
    mark = "PASS" if passed else ("FAIL" if required else "WARN")
    print(f"[{mark}] {name}: {detail}", flush=True)


def _greedy_full_recompute(model, idx, n):
    """Decode without a KV cache: the whole sequence is re-run through the model for every token
    (only the last position goes through the output layer, as HF generate(use_cache=False) does)."""
    last = getattr(model, "_last_logits", None)
    with torch.inference_mode():
        for _ in range(n):
            logits = last(idx, None) if last is not None else model(idx)[0][:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def self_test(config="tiny", device="cpu", dtype=None, compile=False, batch_size=None, seq_len=None,
              prompt_len=32, decode_tokens=None, repeat=3, hf=True, seed=0, progress=True, clock="wall") -> dict:
    """Build the model from a preset and check it works here; measure speed vs LlamaForCausalLM.

    Returns {"checks": [...], "speed": {...}, "passed": bool, ...}; `passed` covers the required
    (correctness) checks only - speed figures are reported, never asserted."""
    import model as M

    device = resolve_device(device)
    dtype = parse_dtype(dtype)
    cuda = device.startswith("cuda")
    if dtype is None:
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    cfg = M.get_config(config) if isinstance(config, str) else config
    seq_len = min(seq_len or (1024 if cuda else 256), cfg.max_seq_len)
    batch_size = batch_size or (16 if cuda else 4)
    decode_tokens = decode_tokens or (128 if cuda else 32)
    prompt_len = max(1, min(prompt_len, cfg.max_seq_len - decode_tokens))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    checks: list = []
    speed: dict = {}
    extra: dict = {}
    V = cfg.vocab_size
    print(f"self-test: config {config if isinstance(config, str) else 'custom'} on {device}, dtype "
          f"{str(dtype).replace('torch.', '')}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)

    model = M.GPT(cfg).to(device)
    # 1. parameter count: module parameters vs the formula used for the size table
    n = model.num_params()
    _check(checks, "parameter count", n == M.count_params(cfg),
           f"{n:,} parameters ({n / 1e6:.2f}M, tied embedding counted once; formula {M.count_params(cfg):,})")

    # 2. loss at init: near-uniform predictions -> cross-entropy close to ln(vocab)
    x = torch.randint(0, V, (2, min(128, seq_len)), generator=gen).to(device)
    y = torch.randint(0, V, (2, min(128, seq_len)), generator=gen).to(device)
    model.eval()
    with torch.no_grad():
        _, loss0 = model(x, y)
    _check(checks, "loss at init ~ ln(vocab)", abs(float(loss0) - math.log(V)) < 0.5,
           f"{float(loss0):.4f} vs ln({V}) = {math.log(V):.4f}")

    # 3. KV cache: prefill + one-token decode steps give the same logits as one full forward
    P, S = min(16, cfg.max_seq_len // 2), min(8, cfg.max_seq_len // 4)
    seq = torch.randint(0, V, (2, P + S), generator=gen).to(device)
    with torch.inference_mode():
        full, _ = model(seq)
        for static in (False, True):
            model.setup_cache(2, P + S, static=static)
            pos = torch.arange(P + S, device=device)
            outs = [model(seq[:, :P], input_pos=pos[:P])[0]]
            for t in range(P, P + S):
                outs.append(model(seq[:, t:t + 1], input_pos=pos[t:t + 1])[0])
            cached = torch.cat(outs, dim=1)
            model.clear_cache()
            err = float((cached - full).abs().max())
            _check(checks, f"KV cache ({'static' if static else 'dynamic'}) = full forward", err < 1e-3,
                   f"max |logit diff| {err:.2e} over {P}-token prefill + {S} decode steps")

    # 4. transformers parity: LlamaForCausalLM with the same weights gives the same logits / tokens
    hf_model = None
    if hf:
        hf_model = M.to_hf(model).to(device).eval()
        hf_model.generation_config.eos_token_id = None  # decode exactly N tokens, like ours
        hf_model.generation_config.pad_token_id = 0
        with torch.inference_mode():
            ref = hf_model(input_ids=seq).logits.float()
        err = float((ref - full).abs().max())
        _check(checks, "same logits as transformers LlamaForCausalLM", err < 1e-3,
               f"max |logit diff| {err:.2e}")
        prompt = seq[:1, :P]
        with torch.inference_mode():
            ours_tok = model.generate(prompt, 16, temperature=0)
            hf_tok = hf_model.generate(prompt, max_new_tokens=16, do_sample=False,
                                       attention_mask=torch.ones_like(prompt))
        same = torch.equal(ours_tok.cpu(), hf_tok.cpu())
        _check(checks, "greedy decode = LlamaForCausalLM.generate", same,
               "16 tokens identical" if same else f"ours {ours_tok[0, P:].tolist()} vs HF {hf_tok[0, P:].tolist()}")

    # 5. forward/backward in the run dtype (autocast), finite loss and gradients
    model.train()
    with torch.no_grad():
        _, ref_loss = model(x, y)
    with _autocast(device, dtype):
        _, loss = model(x, y)
    loss.backward()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    loss = loss.detach()
    ok = bool(torch.isfinite(loss)) and grads_ok and abs(float(loss) - float(ref_loss)) < 0.05 * float(ref_loss)
    _check(checks, f"forward/backward ({str(dtype).replace('torch.', '')})", ok,
           f"loss {float(loss):.4f} (fp32 {float(ref_loss):.4f}), gradients {'finite' if grads_ok else 'NOT finite'}")
    model.zero_grad(set_to_none=True)

    # 6. a few optimizer steps on one batch must lower its loss
    probe = M.GPT(cfg).to(device)
    probe.load_state_dict(model.state_dict())
    opt = M.configure_optimizers(probe, lr=3e-3, device_type="cuda" if cuda else "cpu")
    losses = []
    for _ in range(5):
        with _autocast(device, dtype):
            _, l = probe(x, y)
        l.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(l.detach()))
    _check(checks, "training steps lower the loss", losses[-1] < losses[0] - 0.05,
           " -> ".join(f"{v:.3f}" for v in losses))
    del probe, opt

    # 7. torch.compile: same loss as eager
    compiled = None
    if compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(model)
            with torch.no_grad(), _autocast(device, dtype):
                _, lc = compiled(x, y)
                _, le = model(x, y)
            err = abs(float(lc) - float(le))
            _check(checks, "torch.compile = eager", err < 1e-2 * max(1.0, float(le)),
                   f"loss {float(lc):.4f} vs eager {float(le):.4f} (compile {time.perf_counter() - t0:.1f}s)")
        except Exception as e:  # a missing compiler toolchain is a failed check, not a crash
            compiled = None
            _check(checks, "torch.compile = eager", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")

    # ---------------- speed: ours vs transformers, same weights, same run ----------------
    model.eval()
    mem = PeakMemory(device)
    peak = M.device_peak_flops(device, dtype)
    if clock not in ("wall", "cpu"):
        raise BenchmarkError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    # cpu: process CPU seconds instead of wall seconds - on a shared, oversubscribed machine the
    # wall clock mostly measures the other processes; CPU time measures the work done
    cpu_clock = clock == "cpu" and not cuda
    clock = time.process_time if cpu_clock else time.perf_counter
    pf_len = max(1, min(seq_len, cfg.max_seq_len - 1))

    def row(key, label, ours, theirs, unit):
        ratio = (ours / theirs) if (ours is not None and theirs) else None
        speed[key] = {"label": label, "ours": ours, "hf": theirs, "ratio": ratio, "unit": unit}

    def run_pair(fn_ours, fn_hf, warmup=1):
        # interleaved (ours, HF, ours, HF, ...) so both see the same machine load; medians kept
        fns = [fn_ours] + ([fn_hf] if hf_model is not None else [])
        for fn in fns:
            for _ in range(warmup):
                fn()
        times = [[] for _ in fns]
        for _ in range(max(1, repeat)):
            for k, fn in enumerate(fns):
                _sync(device)
                t0 = clock()
                fn()
                _sync(device)
                times[k].append(clock() - t0)
        med = [sorted(t)[len(t) // 2] for t in times]
        return med[0], (med[1] if len(med) > 1 else None)

    steps = [("prefill", None), ("decode b1 cache", 1), ("decode b8 cache", 8), ("decode b1 no cache", 1),
             ("decode b8 no cache", 8), ("train", None)]
    bar = tqdm(steps, desc="speed", unit="test", leave=False, dynamic_ncols=True) if (progress and tqdm) else steps
    with _autocast(device, dtype):
        for name, B in bar:
            if name == "prefill":
                idx = torch.randint(0, V, (1, pf_len), generator=gen).to(device)
                t_o, t_h = run_pair(lambda: model.generate(idx, 1, temperature=0),
                                    lambda: hf_model.generate(idx, max_new_tokens=1, do_sample=False,
                                                              attention_mask=torch.ones_like(idx)))
                row("prefill_tok_s", f"prefill tokens/s (batch 1, {pf_len} tokens)", pf_len / t_o,
                    pf_len / t_h if t_h else None, "tok/s")
            elif name.startswith("decode"):
                idx = torch.randint(0, V, (B, prompt_len), generator=gen).to(device)
                N = decode_tokens
                if "no cache" in name:
                    t_o, t_h = run_pair(lambda: _greedy_full_recompute(model, idx, N),
                                        lambda: hf_model.generate(idx, max_new_tokens=N, do_sample=False,
                                                                  use_cache=False,
                                                                  attention_mask=torch.ones_like(idx)))
                    key = f"decode_b{B}_nocache_tok_s"
                else:
                    t_o, t_h = run_pair(lambda: model.generate(idx, N, temperature=0),
                                        lambda: hf_model.generate(idx, max_new_tokens=N, do_sample=False,
                                                                  attention_mask=torch.ones_like(idx)))
                    key = f"decode_b{B}_tok_s"
                row(key, f"decode tokens/s (batch {B}, {'no' if 'no cache' in name else 'KV'} cache, "
                    f"{prompt_len}+{N} tokens)", B * N / t_o, B * N / t_h if t_h else None, "tok/s")
            else:
                xb = torch.randint(0, V, (batch_size, seq_len), generator=gen).to(device)
                yb = torch.randint(0, V, (batch_size, seq_len), generator=gen).to(device)
                model.train()
                train_model = compiled if compiled is not None else model
                opt = M.configure_optimizers(model, lr=1e-4, device_type="cuda" if cuda else "cpu")

                def step_ours():
                    _, l = train_model(xb, yb)
                    l.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                step_hf = opt_h = None
                if hf_model is not None:
                    hf_model.train()
                    opt_h = torch.optim.AdamW(M.param_groups(hf_model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                                              eps=1e-8, fused=cuda)

                    def step_hf():
                        out = hf_model(input_ids=xb, labels=xb)
                        out.loss.backward()
                        opt_h.step()
                        opt_h.zero_grad(set_to_none=True)

                # peak memory: one step each on its own (optimizer state already allocated)
                step_ours()
                mem.reset()
                step_ours()
                mem_o = mem.peak()
                mem_h = None
                if step_hf is not None:
                    step_hf()
                    mem.reset()
                    step_hf()
                    mem_h = mem.peak()
                # speed: interleaved steps, medians
                t_o, t_h = run_pair(step_ours, step_hf, warmup=1 if compiled is not None else 0)
                del opt, opt_h
                if hf_model is not None:
                    hf_model.eval()
                model.eval()
                tok = batch_size * seq_len
                row("train_tok_s", f"training step tokens/s (batch {batch_size} x {seq_len}, AdamW)",
                    tok / t_o, tok / t_h if t_h else None, "tok/s")
                if peak:
                    row("train_mfu", "training MFU", M.estimate_mfu(tok / t_o, cfg, seq_len, peak),
                        M.estimate_mfu(tok / t_h, cfg, seq_len, peak) if t_h else None, "fraction")
                row("train_peak_mem_mb", "training peak memory MB (" + ("CUDA allocated" if cuda else
                    "process peak RSS") + ")", mem_o / 2**20 if mem_o else None,
                    mem_h / 2**20 if mem_h else None, "MB")
        if compile and hf_model is not None:
            # model.compile_decode: a static-shape decode step (static KV cache, attention over the
            # whole buffer with a mask) compiled once; on CUDA it is replayed as a CUDA graph
            N, B = decode_tokens, 1
            idx = torch.randint(0, V, (B, prompt_len), generator=gen).to(device)
            model.compile_decode(B, prompt_len + N)

            def compiled_decode():
                return model.generate(idx, N, temperature=0)[:, prompt_len:]

            t0 = time.perf_counter()
            try:
                same = torch.equal(compiled_decode().cpu(),
                                   hf_model.generate(idx, max_new_tokens=N, do_sample=False,
                                                     attention_mask=torch.ones_like(idx))[:, prompt_len:].cpu())
                _check(checks, "compiled decode step = LlamaForCausalLM.generate", same,
                       f"{N} greedy tokens {'identical' if same else 'DIFFER'} "
                       f"(compile {time.perf_counter() - t0:.1f}s)")
                t_o, t_h = run_pair(compiled_decode,
                                    lambda: hf_model.generate(idx, max_new_tokens=N, do_sample=False,
                                                              attention_mask=torch.ones_like(idx)))
                row("decode_b1_compiled_tok_s", f"decode tokens/s (batch 1, KV cache, compiled step, "
                    f"{prompt_len}+{N} tokens)", N / t_o, N / t_h, "tok/s")
            except Exception as e:  # no compiler toolchain: report, do not crash the run
                _check(checks, "compiled decode step = LlamaForCausalLM.generate", False,
                       f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            finally:
                model.clear_cache()
    extra["seq_len"], extra["batch_size"] = seq_len, batch_size
    extra["clock"] = "process CPU time" if cpu_clock else "wall clock"
    extra["prompt_len"], extra["decode_tokens"] = prompt_len, decode_tokens
    required_ok = all(c["passed"] for c in checks if c["required"])
    return {
        "config": config if isinstance(config, str) else "custom",
        "model_config": cfg.to_dict(),
        "params": n,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
        "dtype": str(dtype).replace("torch.", ""),
        "compile": bool(compile),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": extra,
        "checks": checks,
        "speed": speed,
        "passed": required_ok,
    }


def _speed_cells(r: dict) -> tuple[str, str, str]:
    """One speed row's (FishAI, HF, ratio) cells, for the console table and the markdown report."""
    def f(v):
        if v is None:
            return "n/a"
        return f"{v:.1%}" if r["unit"] == "fraction" else f"{v:,.1f}"
    return f(r["ours"]), f(r["hf"]), (f"{r['ratio']:.2f}x" if r["ratio"] else "n/a")


def format_speed_table(speed: dict) -> str:
    lines = [f"{'metric':<66}{'FishAI':>12}{'HF Llama':>12}{'ratio':>8}"]
    for r in speed.values():
        ours, hf, ratio = _speed_cells(r)
        lines.append(f"{r['label']:<66}{ours:>12}{hf:>12}{ratio:>8}")
    return "\n".join(lines)


def self_test_markdown(res: dict) -> str:
    out = [f"## self-test: {res['config']} on {res['device_name']} ({res['dtype']}"
           f"{', torch.compile' if res['compile'] else ''})", "",
           f"{res['date']}, torch {res['torch']}, {res['threads']} threads, {res['params']:,} parameters, "
           f"timed by {res['settings'].get('clock', 'wall clock')} (median of interleaved runs).", "",
           "| check | result | detail |", "|---|---|---|"]
    for c in res["checks"]:
        detail = str(c["detail"]).replace("|", "\\|")  # "max |diff|" must not split the table cell
        out.append(f"| {c['name']} | {'pass' if c['passed'] else 'FAIL'} | {detail} |")
    out += ["", "| metric | FishAI | HF LlamaForCausalLM | ratio |", "|---|---:|---:|---:|"]
    for r in res["speed"].values():
        out.append(f"| {r['label']} | {' | '.join(_speed_cells(r))} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# `data`: end-to-end prepare (data_utils.py) vs bare encode_batch, and peak memory at 1x / Nx corpus size


def _run_measured(cmd: list[str]) -> tuple[float, int, float]:
    """Run a command, return (seconds, peak RSS bytes of that process, CPU seconds user+sys)."""
    import subprocess

    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise BenchmarkError(f"benchmark command failed ({' '.join(cmd)}): {err.strip().splitlines()[-1:] }")
    return time.time() - t0, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime


def make_scaled_corpus(source, out_dir, copies: int, text_key: str = "text") -> tuple[Path, int]:
    """Write `copies` copies of the documents of `source` into out_dir/corpus.txt (blank-line
    separated blocks); copy k > 0 prefixes each document with "[k] " so exact de-duplication does
    not collapse the copies. Returns (path, bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"corpus_x{copies}.txt"
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for k in range(copies):
            for d in du.iter_documents(source, text_key):
                d = d.replace("\n\n", "\n")  # keep each document one block when re-read
                d = re.sub(r"\n\s*\n", "\n", d)
                s = (f"[{k}] " if k else "") + d.strip("\n") + "\n\n"
                n += f.write(s)
    return path, path.stat().st_size


def bench_prepare(input_source, tokenizer, workdir=None, filter_spec: str = "default", scale: int = 10,
          batch_docs: int = 1024, repeat: int = 3, log=print) -> dict:
    """Throughput of prepare (read -> filter -> encode -> write, in a subprocess) vs bare
    encode_batch on the same documents held in memory, and peak RSS of prepare at 1x and
    `scale`x the corpus. The 1x comparison alternates bare / end-to-end `repeat` times and keeps
    the best of each (a shared machine's load hits both alike); CPU seconds are reported too."""
    import resource
    import shutil

    tok = du.load_tokenizer(tokenizer)
    work = Path(workdir or tempfile.mkdtemp(prefix="fishai_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"input": str(input_source), "tokenizer_vocab": tok.vocab_size, "filter": filter_spec,
                 "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "repeat": repeat}

    def prepare_cmd(corpus, outd):
        return [sys.executable, str(Path(__file__).with_name("data_utils.py")), "prepare", "--input", str(corpus), "--tokenizer",
                str(tokenizer), "--output", str(outd), "--filter", filter_spec, "--overwrite", "--quiet",
                "--batch-docs", str(batch_docs)]

    try:
        c1, b1 = make_scaled_corpus(input_source, work / "c1", 1)
        docs = list(du.iter_documents(c1))
        res["corpus_bytes"] = b1
        res["docs"] = len(docs)
        bare_runs, e2e_runs, fast_runs = [], [], []
        for _ in range(max(1, repeat)):
            # bare encode_batch: documents already in memory, same batch size as prepare
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.time()
            n_tok = 0
            for i in range(0, len(docs), batch_docs):
                n_tok += sum(len(e.ids) for e in tok.backend.encode_batch(docs[i:i + batch_docs], add_special_tokens=False))
            wall = time.time() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            bare_runs.append({"seconds": round(wall, 3), "cpu_seconds": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 3),
                              "tokens": n_tok})
            # and the faster variant prepare itself uses, so the overhead of the pipeline shows too
            t0 = time.time()
            for i in range(0, len(docs), batch_docs):
                du.fast_encode_batch(tok.backend, docs[i:i + batch_docs])
            fast_runs.append(round(time.time() - t0, 3))
            outd = work / "out1"
            secs, rss, cpu = _run_measured(prepare_cmd(c1, outd))
            meta = json.loads((outd / "meta.json").read_text())
            e2e_runs.append({"seconds_pipeline": meta["seconds"], "seconds_process": round(secs, 3),
                             "cpu_seconds_process": round(cpu, 3), "peak_rss_MB": round(rss / 2**20, 1),
                             "tokens": meta["train"]["tokens"] + meta["val"]["tokens"],
                             "filter_dropped": (meta.get("filter") or {}).get("dropped")})
            shutil.rmtree(outd, ignore_errors=True)
        del docs
        best_bare = min(bare_runs, key=lambda r: r["seconds"])
        best_e2e = min(e2e_runs, key=lambda r: r["seconds_pipeline"])
        res["bare_encode_batch"] = {**best_bare, "MB_per_s": round(b1 / 1e6 / best_bare["seconds"], 3),
                                    "all_seconds": [r["seconds"] for r in bare_runs]}
        res["end_to_end_x1"] = {**best_e2e, "MB_per_s": round(b1 / 1e6 / best_e2e["seconds_pipeline"], 3),
                                "all_seconds": [r["seconds_pipeline"] for r in e2e_runs]}
        res["end_to_end_vs_bare"] = round(res["end_to_end_x1"]["MB_per_s"] / res["bare_encode_batch"]["MB_per_s"], 3)
        res["bare_encode_batch_fast"] = {"seconds": min(fast_runs), "MB_per_s": round(b1 / 1e6 / min(fast_runs), 3),
                                         "all_seconds": fast_runs}
        res["end_to_end_vs_bare_fast"] = round(res["end_to_end_x1"]["MB_per_s"]
                                               / res["bare_encode_batch_fast"]["MB_per_s"], 3)
        if scale and scale > 1:
            cp, nb = make_scaled_corpus(input_source, work / f"c{scale}", scale)
            outd = work / f"out{scale}"
            secs, rss, cpu = _run_measured(prepare_cmd(cp, outd))
            meta = json.loads((outd / "meta.json").read_text())
            res[f"end_to_end_x{scale}"] = {"corpus_bytes": nb, "seconds_pipeline": meta["seconds"],
                                          "MB_per_s": round(nb / 1e6 / meta["seconds"], 3),
                                          "cpu_seconds_process": round(cpu, 3), "peak_rss_MB": round(rss / 2**20, 1),
                                          "tokens": meta["train"]["tokens"] + meta["val"]["tokens"],
                                          "filter_dropped": (meta.get("filter") or {}).get("dropped")}
            shutil.rmtree(outd, ignore_errors=True)
            shutil.rmtree(work / f"c{scale}", ignore_errors=True)
            res["peak_rss_MB_x1_vs_xN"] = [best_e2e["peak_rss_MB"], res[f"end_to_end_x{scale}"]["peak_rss_MB"]]
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if log:
        log(json.dumps(res, indent=2))
    return res


# ----------------------------------------------------------------------------------------------
# CLI

def add_output_args(parser, json_help="write the results as JSON"):
    """--json/--report/--overwrite/--no-progress, shared by both subcommands and reference_benchmark.py."""
    parser.add_argument("--json", metavar="PATH", help=json_help)
    parser.add_argument("--report", metavar="PATH", help="write a markdown report")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json/--report files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_outputs(args):
    """Refuse to overwrite an existing --json/--report file unless --overwrite."""
    for flag in ("json", "report"):
        path = getattr(args, flag)
        if path and Path(path).exists() and not args.overwrite:
            raise BenchmarkError(f"--{flag} {path}: file exists; pass --overwrite to replace it")


def write_outputs(args, res, to_markdown):
    """Write --json (the results) and --report (to_markdown(results)) after a run; the paths were
    checked by check_outputs before the run started."""
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    if args.report:
        atomic_write_text(args.report, to_markdown(res))
        print(f"wrote {args.report}")


def add_data_args(parser):
    """The dataset and scoring flags, shared by benchmark.py full and reference_benchmark.py."""
    parser.add_argument("--wikitext103", metavar="PATH", help="local WikiText-103 file (e.g. wiki.test.tokens)")
    parser.add_argument("--wikitext2", metavar="PATH", help="local WikiText-2 file (e.g. test.txt)")
    parser.add_argument("--ptb", metavar="PATH", help="local PTB file (e.g. ptb.test.txt)")
    parser.add_argument("--data", action="append", metavar="NAME=PATH", help="extra dataset (repeatable); NAME "
                        "wikitext103/wikitext2/ptb uses that reader, anything else reads plain text")
    parser.add_argument("--split", default="test", help="split for hub datasets (default test)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N documents per dataset")
    parser.add_argument("--max-chars", type=int, default=None, help="score at most N characters per dataset "
                        "(quick runs; cut at a line boundary)")
    parser.add_argument("--detokenize", action="store_true", help="undo WikiText tokenization (' @-@ ', ' , ') "
                        "before scoring, as the GPT-2 paper's zero-shot numbers did")
    parser.add_argument("--stride", type=int, default=None, help="new tokens per window (default: context length = "
                        "disjoint windows; smaller = more context per token, slower)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="cap the context window (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FishAI benchmarks: self-test (correctness + speed vs transformers) "
                                "and full (perplexity + generation quality).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage:")[1]
                                .split("Scoring conventions")[0])
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("self-test", help="build a preset, check correctness, measure speed vs HF Llama")
    st.add_argument("--config", default="tiny", help="model preset: tiny, small, medium, large (default tiny)")
    st.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    st.add_argument("--dtype", default=None, help="autocast dtype: float32, bf16, fp16 "
                    "(default bf16 on CUDA, float32 on CPU)")
    st.add_argument("--compile", action="store_true",
                    help="also check and time torch.compile: the training step and a static-cache decode step "
                    "(CUDA graphs on GPU)")
    st.add_argument("--batch-size", type=int, default=None, help="training batch (default 4 CPU / 16 CUDA)")
    st.add_argument("--seq-len", type=int, default=None, help="training/prefill length (default 256 CPU / 1024 CUDA)")
    st.add_argument("--prompt-len", type=int, default=32, help="decode prompt length (default 32)")
    st.add_argument("--decode-tokens", type=int, default=None,
                    help="new tokens per decode run (default 32 CPU / 128 CUDA)")
    st.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the median is kept (default 3)")
    st.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time with the wall clock (default) or process CPU time (CPU only: steadier on a busy "
                         "machine; speeds are then tokens per CPU-second)")
    st.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    st.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice); "
                    "1 gives steadier numbers on a busy machine")
    st.add_argument("--seed", type=int, default=0)
    add_output_args(st)

    fu = sub.add_parser("full", help="perplexity on WikiText-103/WikiText-2/PTB + generation quality")
    fu.add_argument("--model", default="checkpoints/fishai-best.pt",
                    help="checkpoint .pt, quantized .bin, HF dir (or hub name with --hf); "
                         "default checkpoints/fishai-best.pt")
    fu.add_argument("--hf", action="store_true", help="load --model through transformers AutoModelForCausalLM")
    fu.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    fu.add_argument("--dtype", default=None, help="model dtype: float32, bf16, fp16 (default: as stored)")
    add_data_args(fu)
    fu.add_argument("--no-generation", action="store_true", help="skip the generation-quality samples")
    fu.add_argument("--samples", type=int, default=2, help="samples per prompt (default 2)")
    fu.add_argument("--gen-tokens", type=int, default=64, help="new tokens per sample (default 64)")
    fu.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    fu.add_argument("--top-k", type=int, default=50, help="top-k sampling, 0 = off (default 50)")
    fu.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    add_output_args(fu, "write results as JSON (keys as in DESIGN.md)")

    da = sub.add_parser("data", help="data_utils.py prepare end to end vs bare encode_batch; peak memory at 1x/Nx")
    da.add_argument("--input", required=True, help="corpus (any data_utils.iter_documents source)")
    da.add_argument("--tokenizer", required=True, help="tokenizer dir")
    da.add_argument("--filter", default="default", help="filter spec used by prepare (default: default)")
    da.add_argument("--scale", type=int, default=10, help="the large corpus is this many copies (memory check; default 10)")
    da.add_argument("--repeat", type=int, default=3, help="alternate bare / end-to-end runs this often, keep the best (default 3)")
    da.add_argument("--workdir", default=None, help="keep temp corpora here (default: a temp dir, removed)")
    add_output_args(da)
    return p


def run_data(args) -> int:
    check_outputs(args)
    res = bench_prepare(args.input, args.tokenizer, workdir=args.workdir, filter_spec=args.filter, scale=args.scale,
                        repeat=args.repeat, log=None)
    print(json.dumps(res, indent=2))
    write_outputs(args, res, lambda r: "```json\n" + json.dumps(r, indent=2) + "\n```\n")
    return 0


def run_self_test(args) -> int:
    check_outputs(args)
    import model as M
    if args.config not in M.CONFIGS:
        raise BenchmarkError(f"--config {args.config!r}: choose one of {', '.join(M.CONFIGS)}")
    for flag in ("batch_size", "seq_len", "prompt_len", "decode_tokens", "repeat"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise BenchmarkError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    res = self_test(args.config, device=args.device, dtype=args.dtype, compile=args.compile,
                    batch_size=args.batch_size, seq_len=args.seq_len, prompt_len=args.prompt_len,
                    decode_tokens=args.decode_tokens, repeat=args.repeat, hf=not args.no_hf, seed=args.seed,
                    progress=not args.no_progress, clock=args.clock)
    print()
    print(format_speed_table(res["speed"]))
    failed = [c["name"] for c in res["checks"] if c["required"] and not c["passed"]]
    print(f"\n{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    write_outputs(args, res, self_test_markdown)
    return 0 if not failed else 1


def run_cli(fn, args) -> int:
    """Run a command with the scripts' error contract: one `error:` line and exit 2 on bad input,
    130 on Ctrl-C (shared with reference_benchmark.py)."""
    try:
        return fn(args)
    except (BenchmarkError, ValueError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli({"self-test": run_self_test, "full": run_full, "data": run_data}[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
