"""
Scoring, the library under benchmark.py, evaluate.py, quantize.py, quick_train.py,
reference_benchmark.py and serve.py: one interface over a FishAI GPT and any transformers causal
LM (`LM`, `load_lm`), log-likelihoods (`loglikelihood`, lm-evaluation-harness's rule), perplexity
over rolling windows with word/byte/char counts on the original text (`perplexity`,
`rolling_windows`), the evaluation texts (`load_eval_texts`, `load_datasets`: WikiText-103/2, PTB,
plain files, any data_utils source) and the perplexity formatting; the decode-path check
(`check_decode_paths_agree`).

    import scoring
    lm = scoring.load_lm("checkpoints/fishai-best.pt", device="cpu")
    texts = scoring.load_eval_texts("wikitext2", "../shared/data/wikitext2")
    print(scoring.describe_ppl("WikiText-2", scoring.perplexity(lm, texts)))
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import readers
import engine
from engine import cut_at_stop, fast_decode_default, fit_prompt, stream_generate
from model import CheckpointError, load_model

try:  # tqdm is a hard dependency of the project, but keep the scoring core importable without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

class ScoringError(common.FishAIError):
    """Bad input for a benchmark (model spec, flag, dataset); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# one interface over a FishAI GPT and any transformers causal LM

def _hits_stop(text: str, stops) -> bool:
    """True when model.cut_at_stop would cut `text` (it holds one of the stop strings)."""
    return cut_at_stop(text, stops) != text


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
        # generation decodes through the compiled CUDA-graph step on a GPU (engine.fast_decode_default)
        self.compile = kind == "fishai" and fast_decode_default(device)

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
        (the text is cut there by generate()). A prompt too long for the context keeps its newest
        tokens (model.fit_prompt)."""
        prompt, max_new = fit_prompt([int(t) for t in prompt_ids] or [self.begin_id], max_new_tokens,
                                            self.max_seq_len)
        if max_new == 0:
            return [], False
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        stop = [s for s in (stop or []) if s]
        sample = self._sample_fishai if self.kind == "fishai" else self._sample_hf
        return sample(idx, max_new, temperature, top_k, top_p, stop, seed)

    def _take_until_eos(self, tokens, stop=()) -> tuple[list[int], bool]:
        """The new ids before EOS and whether EOS came; ends early once the text holds a stop string."""
        new: list[int] = []
        for t in tokens:
            t = int(t)
            if self.eos_id is not None and t == self.eos_id:
                return new, True
            new.append(t)
            if stop and _hits_stop(self.decode(new), stop):
                break
        return new, False

    def _sample_fishai(self, idx, max_new, temperature, top_k, top_p, stop, seed):
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed))
        steps = stream_generate(self.model, idx[0].tolist(), max_new, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop_ids=[] if self.eos_id is None else [self.eos_id], generator=gen,
                                compile=self.compile)
        try:
            return self._take_until_eos((row[0] for row in steps if row[0] is not None), stop)
        finally:
            steps.close()

    def _sample_hf(self, idx, max_new, temperature, top_k, top_p, stop, seed):
        if seed is not None:
            torch.manual_seed(int(seed))
        kwargs = dict(max_new_tokens=max_new, attention_mask=torch.ones_like(idx),
                      pad_token_id=self.eos_id if self.eos_id is not None else 0)
        if self.eos_id is not None:
            kwargs["eos_token_id"] = self.eos_id
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature),
                          top_k=top_k if top_k else 0, top_p=top_p if top_p else 1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if stop:
            kwargs["stopping_criteria"] = self._hf_stopping(idx.shape[1], stop)
        out = self.model.generate(idx, **kwargs)[0, idx.shape[1]:].tolist()
        return self._take_until_eos(out)

    def _hf_stopping(self, prompt_len: int, stop):
        """transformers stopping criteria: stop once the new text holds a stop string."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        lm = self

        class _StopOnStrings(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                hit = _hits_stop(lm.decode(input_ids[0, prompt_len:].tolist()), stop)
                return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_StopOnStrings()])

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None,
                 top_p=None, stop=None, seed=None) -> str:
        """Continue one prompt and return the new text (cut before the first stop string, no EOS)."""
        new, _ = self.generate_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, stop, seed)
        return cut_at_stop(self.decode(new), stop)


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


def _from_pretrained(spec: str, local: bool, kwargs: dict):
    """(tokenizer, model) through transformers; a hub name is tried in the local cache first, so a
    cached model works offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not local:
        try:
            return (AutoTokenizer.from_pretrained(spec, local_files_only=True),
                    AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **kwargs))
        except OSError:
            if not readers.hub_reachable():
                raise ScoringError(
                    f"cannot load {spec!r}: it is not in the local Hugging Face cache and the hub "
                    "is unreachable (offline); download it on a connected machine or pass a local "
                    "model directory") from None
    return AutoTokenizer.from_pretrained(spec), AutoModelForCausalLM.from_pretrained(spec, **kwargs)


def _hf_context(model, tok) -> int:
    """lm-evaluation-harness' rule: the model's own context length attribute, else the tokenizer's."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(model.config, attr, None):
            return int(getattr(model.config, attr))
    tml = getattr(tok, "model_max_length", None)
    return int(tml) if tml and tml < 1_000_000 else 2048


def _load_transformers(spec: str, device: str, dtype, max_seq_len: int | None) -> LM:
    local = Path(spec).exists()
    if not local and _looks_like_path(spec):
        raise ScoringError(f"{spec}: no such file or directory; pass a model directory saved with "
                             "save_pretrained, or a hub name (org/name)")
    if local and not Path(spec).is_dir():
        raise ScoringError(f"{spec}: a transformers model must be a directory (config.json + weights) "
                             "or a hub name")
    try:
        tok, model = _from_pretrained(spec, local, {} if dtype is None else {"dtype": dtype})
    except ScoringError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ScoringError(f"cannot load transformers model {spec!r}: {common.one_line(e)}") from None
    model.to(device).eval()
    eos = tok.eos_token_id
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
    begin = tok.bos_token_id if tok.bos_token_id is not None else eos
    vocab = getattr(model.config, "vocab_size", None) or len(tok)
    return LM(model, tok, kind="hf", name=spec, device=device, eos_id=eos, vocab_size=vocab, begin_id=begin,
              max_seq_len=_hf_context(model, tok) if max_seq_len is None else max_seq_len)


def _load_fishai(spec: str, device: str, dtype, max_seq_len: int | None, dequantize: bool = False) -> LM:
    try:
        model = load_model(spec, device=device, dtype=dtype, dequantize=dequantize)
    except (CheckpointError, FileNotFoundError) as e:
        raise ScoringError(common.one_line(e)) from None
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ScoringError(f"{spec}: the model has no tokenizer attached; save the checkpoint with its "
                             "tokenizer (train.py does) or use an HF directory with tokenizer files")
    model.eval()
    ctx = model.config.max_seq_len if max_seq_len is None else min(max_seq_len, model.config.max_seq_len)
    eos = getattr(tok, "eos_id", None)
    return LM(model, tok, kind="fishai", name=str(spec), device=device, max_seq_len=ctx, eos_id=eos,
              vocab_size=model.config.vocab_size, begin_id=eos)


def load_lm(spec, device: str = "cpu", dtype=None, hf: bool = False, max_seq_len: int | None = None,
            dequantize: bool = False) -> LM:
    """Load something to score.

    spec: a FishAI checkpoint (.pt), a quantized export (.bin), a FishAI/Llama HF directory (loaded by
    model.load_model as a FishAI GPT), or with hf=True any transformers causal-LM directory or hub
    name. A directory whose config.json is not a Llama model is loaded through transformers even
    without hf=True. Never uses trust_remote_code. device: as model.resolve_device ("auto", "cpu",
    "cuda", ...); dtype: as model.resolve_dtype (None keeps the stored dtype; "auto", "fp32", "bf16",
    "float16", ...). max_seq_len caps the context window (default: the model's own). A quantized .bin
    runs on its int8/int4 kernels unless dequantize=True (model.load_model). Raises
    ScoringError with a one-line message when it cannot load.
    """
    try:
        device = common.resolve_device(device)
        dtype = common.resolve_dtype(dtype, device)
    except common.FishAIError as e:
        raise ScoringError(common.one_line(e)) from None
    device, spec = str(device), str(spec)
    path = Path(spec)
    if hf:
        return _load_transformers(spec, device, dtype, max_seq_len)
    if path.is_dir():
        mtype = _hf_dir_model_type(path)
        if mtype is None:
            kind = common.file_kind(path)  # a run, tokenizer or prepared folder: say which, and what takes it
            what = (f"{common.describe(path, kind)}; a model is" if kind in common.PROJECT_KINDS else
                    f"{spec}: directory has no config.json; pass")
            raise ScoringError(f"{what} a checkpoint (.pt), a quantized .bin, or a model directory saved with "
                               "save_pretrained")
        if mtype != "llama":
            return _load_transformers(spec, device, dtype, max_seq_len)
        try:
            return _load_fishai(spec, device, dtype, max_seq_len)
        except ScoringError as e:
            # a Llama the FishAI GPT cannot represent (untied head, biases, RoPE scaling): transformers
            try:
                return _load_transformers(spec, device, dtype, max_seq_len)
            except ScoringError:
                raise e from None
    if path.is_file():
        return _load_fishai(spec, device, dtype, max_seq_len, dequantize)
    if _looks_like_path(spec):
        raise ScoringError(f"{spec}: no such file or directory; pass a checkpoint (.pt), a quantized "
                             ".bin, a model directory or a hub name (org/name)")
    # not a local path: a hub name ("gpt2", "EleutherAI/pythia-70m")
    return _load_transformers(spec, device, dtype, max_seq_len)


# ----------------------------------------------------------------------------------------------
# scoring

def _prepare_requests(lm: LM, requests) -> list[tuple[int, list[int], list[int]]]:
    """[(index, input ids, continuation ids)], longest input first: each context is cut from the left
    so that context + continuation fits lm.max_seq_len (+1 for the shift); an empty context becomes
    the begin token."""
    L = lm.max_seq_len
    prepared = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not cont:
            raise ScoringError(f"loglikelihood request {i} has an empty continuation")
        if len(cont) > L:
            raise ScoringError(f"loglikelihood request {i}: continuation of {len(cont)} tokens is longer "
                                 f"than the model's context ({L})")
        full = ((ctx or [lm.begin_id]) + cont)[-(L + 1):]
        prepared.append((i, full[:-1], cont))
    prepared.sort(key=lambda r: (-len(r[1]), r[0]))
    return prepared


def _score_chunk(lm: LM, chunk) -> list[tuple[int, float, bool]]:
    """One right-padded forward pass (causal attention makes the padding invisible) ->
    [(index, sum log p(continuation), is_greedy)]."""
    T = len(chunk[0][1])  # longest first: the first row of a chunk is its longest
    idx = torch.zeros(len(chunk), T, dtype=torch.long)
    for b, (_, inp, _) in enumerate(chunk):
        idx[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
    logits = lm.logits(idx)
    out = []
    for b, (i, inp, cont) in enumerate(chunk):
        # the logits at input positions [len - n, len) predict the n continuation tokens
        row = logits[b, len(inp) - len(cont):len(inp)]
        tgt = torch.tensor(cont, dtype=torch.long, device=row.device)
        lp = F.log_softmax(row, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)
        out.append((i, float(lp.double().sum()), bool((row.argmax(-1) == tgt).all())))
    return out


def loglikelihood(lm: LM, requests, batch_size: int = 8, progress: bool = True) -> list[tuple[float, bool]]:
    """Score continuations: for each (context_ids, continuation_ids) -> (sum log p(cont | ctx), is_greedy).

    Requests are batched longest first (right-padded; causal attention makes the padding invisible),
    the context is truncated from the left so context + continuation fits lm.max_seq_len (+1 for the
    shift), an empty context becomes the begin token, and results come back in the original order.
    is_greedy: every continuation token is the argmax of its predicted distribution.
    """
    prepared = _prepare_requests(lm, requests)
    results: list = [None] * len(prepared)
    bar = None
    if progress and tqdm is not None and prepared:
        bar = tqdm(total=sum(len(r[2]) for r in prepared), unit="tok", desc=f"scoring {lm.name}"[:60],
                   leave=False, dynamic_ncols=True)
    # cap the (B, T, V) float32 logits of one forward (e.g. SmolLM2: 8192 x 49152 = 1.6 GB per row)
    budget = 2 * 2**30
    start = 0
    while start < len(prepared):
        T = len(prepared[start][1])
        bs = max(1, min(int(batch_size), budget // max(1, T * lm.vocab_size * 4)))
        chunk = prepared[start:start + bs]
        start += len(chunk)
        for i, score, greedy in _score_chunk(lm, chunk):
            results[i] = (score, greedy)
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
    _check_stride(stride, L)
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


def _check_stride(stride: int, max_seq_len: int) -> None:
    if not 1 <= stride <= max_seq_len:
        raise ScoringError(f"--stride {stride}: must be between 1 and the context length {max_seq_len}")


def count_words(text: str) -> int:
    """Word count as lm-evaluation-harness (`len(re.split(r"\\s+", doc))`)."""
    return len(re.split(r"\s+", text))


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def perplexity(lm: LM, texts, stride: int | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """Rolling log-likelihood of the documents -> bits_per_byte, word_ppl, char_ppl, token_ppl, and the
    counts (tokens, words, chars, bytes) they come from.

    stride: new tokens predicted per window (default: lm.max_seq_len, disjoint windows); smaller
    strides give each token up to max_seq_len - stride tokens of extra context. Documents that
    tokenize to nothing (empty strings) are skipped entirely. Word, character and byte counts come
    from the original text, so results of models with different tokenizers are comparable.
    spaced: False for text without spaces between words (readers.is_spaced), where tables show char_ppl
    instead of word_ppl; chars_per_token is the tokenizer's compression on this text.
    """
    texts = [texts] if isinstance(texts, str) else texts
    stride = lm.max_seq_len if stride is None else int(stride)
    _check_stride(stride, lm.max_seq_len)
    requests = []
    n = {"tokens": 0, "words": 0, "chars": 0, "bytes": 0, "documents": 0}
    for text in texts:
        ids = lm.encode(text)
        if not ids:
            continue
        n["documents"] += 1
        n["tokens"] += len(ids)
        n["words"] += count_words(text)
        n["chars"] += len(text)
        n["bytes"] += len(text.encode("utf-8"))
        requests.extend(rolling_windows(ids, lm.begin_id, lm.max_seq_len, stride))
    if n["tokens"] == 0:
        raise ScoringError("perplexity: no tokens to score (all documents are empty)")
    t0 = time.perf_counter()
    nll = -sum(s for s, _ in loglikelihood(lm, requests, batch_size=batch_size, progress=progress))
    return {
        "bits_per_byte": nll / n["bytes"] / math.log(2),
        "word_ppl": _safe_exp(nll / n["words"]),
        "char_ppl": _safe_exp(nll / n["chars"]),
        "token_ppl": _safe_exp(nll / n["tokens"]),
        "spaced": readers.is_spaced(n["chars"], n["words"]),
        "chars_per_token": n["chars"] / n["tokens"],
        **n,
        "nll": nll,
        "windows": len(requests),
        "stride": stride,
        "max_seq_len": lm.max_seq_len,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def headline_ppl(r: dict) -> tuple[float, str]:
    """The perplexity a table shows next to bits/byte: (word_ppl, "word") for spaced text,
    (char_ppl, "char") for text without spaces between words."""
    return (r["word_ppl"], "word") if r["spaced"] else (r["char_ppl"], "char")


def fmt_ppl(v) -> str:
    """Perplexity for tables: 2 decimals, scientific notation for untrained-model sizes."""
    if v is None:
        return "n/a"
    return f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def describe_ppl(label: str, r: dict) -> str:
    """One console line for a perplexity() result, bits/byte first."""
    value, per = headline_ppl(r)
    return (f"{label}: bits/byte {r['bits_per_byte']:.4f}, {per} ppl {fmt_ppl(value)}, token ppl "
            f"{fmt_ppl(r['token_ppl'])} ({r['tokens']:,} tokens, {r['seconds']:.1f}s)")



DEFAULT_DATASETS = ("wikitext103", "wikitext2", "ptb")
DATASET_LABELS = {"wikitext103": "WikiText-103", "wikitext2": "WikiText-2", "ptb": "PTB"}


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



EVAL_SETS = ("wikitext103", "wikitext2", "ptb")  # the sets with a reader of their own (and an HF hub copy)


def load_eval_texts(name: str, path=None, *, split: str = "test", limit: int | None = None,
                    max_chars: int | None = None, detokenize: bool = False) -> list[str]:
    """The one loader of evaluation texts, so every perplexity in the project is over the same
    documents. name: wikitext103 / wikitext2 / ptb (their reader, read_eval_set: the HF hub copy
    when path is None); any other name needs a path: a plain file is one document, anything else
    readers.iter_documents reads (dir, glob, jsonl, parquet, hf:NAME) gives
    its documents. Empty documents are dropped; limit keeps the first N, max_chars cuts the set at a
    line boundary (quick runs). ScoringError naming the set when it cannot be read or is empty."""
    key = name.lower().replace("-", "").replace("_", "")
    try:
        if key in EVAL_SETS:
            docs = read_eval_set(key, path, split=split, detokenize=detokenize)
        elif path is None:
            raise ScoringError(f"{name}: unknown dataset name without a path; use --data {name}=PATH")
        elif Path(path).is_file() and Path(path).suffix not in (".jsonl", ".parquet", ".gz"):
            docs = read_eval_set("text", path)
        else:
            docs = list(readers.iter_documents(str(path)))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        msg = common.one_line(e)
        raise ScoringError(msg if msg.startswith(name) else f"{name}: {msg}") from None
    docs = [d for d in docs if d and d.strip()]
    docs = docs[:limit] if limit else docs
    docs = truncate_docs(docs, max_chars) if max_chars else docs
    if not docs:
        raise ScoringError(f"{name}: no text found in {path or 'the hub copy'}")
    return docs


def load_datasets(specs, split: str = "test", limit: int | None = None, errors=None,
                  max_chars: int | None = None, detokenize: bool = False) -> dict:
    """[(name, path_or_None), ...] -> {name: [documents]} through load_eval_texts. A dataset that
    cannot be loaded is reported in `errors` (name -> message) and skipped, so one offline dataset
    does not stop the others (without `errors` it raises)."""
    out = {}
    for name, path in specs:
        try:
            out[name] = load_eval_texts(name, path, split=split, limit=limit, max_chars=max_chars,
                                        detokenize=detokenize)
        except ScoringError as e:
            if errors is None:
                raise
            errors[name] = str(e)
    return out


def parse_eval_spec(spec: str) -> tuple[str, str | None]:
    """A --eval-data value -> (name, path) for load_eval_texts: "wikitext103" (the hub copy),
    "NAME:PATH" / "NAME=PATH" (a set from a local file or directory), a WikiText file or directory
    (wiki.*.tokens), or any other path (its text)."""
    for sep in ("=", ":"):
        name, found, rest = spec.partition(sep)
        if found and name in EVAL_SETS and rest:
            return name, rest
    if spec in EVAL_SETS:
        return spec, None
    p = Path(spec)
    if p.is_file() and p.name.startswith("wiki.") or p.is_dir() and any(p.glob("wiki.*.tokens")):
        return "wikitext103", spec
    return p.stem or "text", spec


def format_ppl_table(results: dict, title: str | None = None) -> str:
    """{dataset: perplexity() dict} -> a fixed-width terminal table, bits/byte first; `ppl` is per
    word for spaced text and per character for text without spaces (the `per` column says which)."""
    lines = [title] if title else []
    lines.append(f"{'dataset':<14}{'bits/byte':>10}{'ppl':>11} {'per':<5}{'token ppl':>11}{'tokens':>10}"
                 f"{'chars/tok':>10}{'bytes':>11}{'sec':>8}")
    for name, r in results.items():
        value, per = headline_ppl(r)
        lines.append(f"{DATASET_LABELS.get(name, name):<14}{r['bits_per_byte']:>10.4f}{fmt_ppl(value):>11} "
                     f"{per:<5}{fmt_ppl(r['token_ppl']):>11}{r['tokens']:>10,}{r['chars_per_token']:>10.2f}"
                     f"{r['bytes']:>11,}{r.get('seconds', 0):>8.1f}")
    return "\n".join(lines)



def parse_data_flags(args) -> list[tuple[str, str | None]]:
    """--wikitext103/--wikitext2/--ptb/--data name=path -> [(name, path)]; none -> the HF defaults."""
    specs = [(name, getattr(args, name)) for name in DEFAULT_DATASETS if getattr(args, name, None)]
    for item in args.data or []:
        name, _, path = item.partition("=")
        if not name or not path:
            raise ScoringError(f"--data {item!r}: expected NAME=PATH (e.g. --data mytext=notes.txt)")
        specs.append((name, path))
    if not specs:  # nothing local given: the standard test sets from the HF hub
        specs = [(name, None) for name in DEFAULT_DATASETS]
    for name, path in specs:
        if path is not None and not Path(path).exists():
            raise ScoringError(f"{path}: no such file (given for dataset {name})")
    return specs



def decode_tolerance(dtype) -> float:
    """Largest |logit difference| between two decode paths, relative to the largest |logit|, that
    still counts as the same numbers: fp32 rounding, or a half-precision dtype's (bf16 has 8
    significant bits; two kernels that sum in another order differ by a few of its ulps)."""
    return 1e-4 if dtype in (None, torch.float32) else 3e-2


def check_decode_paths_agree(model, seq, prompt_len: int, dtype) -> tuple[bool, str]:
    """The engine's compiled step (compiled, CUDA graph) against its eager step, teacher-forced on
    seq: per-step logits within decode_tolerance. Greedy text is no check on random weights:
    near-tied logits flip an argmax, and one flip changes every later input."""
    fast = engine.Engine(model, seq.shape[0], compile=True)
    got, path = fast.teacher_forced(seq, prompt_len), fast.path
    del fast
    ref = engine.Engine(model, seq.shape[0], seq.shape[1]).teacher_forced(seq, prompt_len)
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    ok = err <= decode_tolerance(dtype) * scale
    return ok, (f"{path}: max |logit diff| {err:.2e} over {got.shape[1]} teacher-forced steps (largest |logit| "
                f"{scale:.2f}, tolerance {decode_tolerance(dtype):g} of it)")



# ----------------------------------------------------------------------------------------------
# evaluation texts (benchmark.py computes word/byte counts on the strings returned here)

_WIKI_HEADING = re.compile(r"^ = [^=].* = $")

_SPLIT_ALIASES = {"test": "test", "valid": "valid", "validation": "valid", "val": "valid", "train": "train"}


def wikitext_detokenizer(string: str) -> str:
    """Undo WikiText's tokenisation (" @-@ ", " , ", ...) the way lm-evaluation-harness's
    wikitext task does (same rules, same order)."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def split_wikitext_articles(text: str) -> list[str]:
    """Split a WikiText file into articles at the top-level ' = Title = ' heading lines (as the
    document-level WikiText of lm-evaluation-harness does). Article text is kept byte for byte."""
    pages: list[str] = []
    cur: list[str] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if _WIKI_HEADING.match(line) and any(l.strip() for l in cur):
            pages.append("".join(cur))
            cur = []
        cur.append(line + "\n" if i < len(lines) - 1 else line)  # keep every byte of the file
    if any(l.strip() for l in cur):
        pages.append("".join(cur))
    return pages


def _find_split_file(path: Path, name: str, split: str) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise common.DataError(f"{path}: no such file or directory for eval set '{name}'")
    short = _SPLIT_ALIASES[split]
    cands = {
        "wikitext103": [f"wiki.{short}.tokens", f"wiki.{short}.raw", f"{short}.txt"],
        "wikitext2": [f"wiki.{short}.tokens", f"{short}.txt", f"wiki.{short}.raw"],
        "ptb": [f"ptb.{short}.txt", f"{short}.txt"],
    }[name]
    for c in cands:
        if (path / c).is_file():
            return path / c
    raise common.DataError(f"{path}: no {split} file for '{name}' (looked for {', '.join(cands)})")


def _read_eval_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise common.DataError(f"{path}: cannot read ({e.strerror})") from None
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise common.DataError(f"{path}: file is empty")
    return text


def read_eval_set(name: str, path=None, split: str = "test", detokenize: bool = False) -> list[str]:
    """One evaluation set as its documents (load_eval_texts is the entry point).

    name: "wikitext103" | "wikitext2" -> one string per article (split at the top-level
            ' = Title = ' headings), from local `wiki.{split}.tokens` / `{split}.txt` files
            (path = file or directory) or, when path is None, from HF `wikitext` configs
            `wikitext-103-raw-v1` / `wikitext-2-raw-v1`. The text is returned as in the file
            (not detokenised, like lm-evaluation-harness, which scores and counts words on the
            original page); detokenize=True applies `wikitext_detokenizer`.
          "ptb"  -> one string: the whole split, one sentence per line, as in `ptb.{split}.txt`
            (PTB is scored as one continuous stream); HF `ptb_text_only` when path is None.
          "text" -> one string: the whole plain file at `path`.
    """
    name = name.lower().replace("-", "").replace("_", "")
    if name not in ("wikitext103", "wikitext2", "ptb", "text"):
        raise common.DataError(f"unknown eval set '{name}'; choose wikitext103, wikitext2, ptb or text")
    if split not in _SPLIT_ALIASES:
        raise common.DataError(f"unknown split '{split}'; choose test, valid or train")
    if name == "text":
        if path is None:
            raise common.DataError("eval set 'text' needs a file path")
        return [_read_eval_file(Path(path))]
    if path is not None:
        f = _find_split_file(Path(path), name, split)
        text = _read_eval_file(f)
        if name == "ptb":
            return [text]
        pages = split_wikitext_articles(text)
    else:
        hf_split = {"test": "test", "valid": "validation", "train": "train"}[_SPLIT_ALIASES[split]]
        if name == "ptb":
            rows = readers.load_hf_dataset("ptb_text_only", None, split=hf_split)
            return ["\n".join(r["sentence"] for r in rows) + "\n"]
        cfg = "wikitext-103-raw-v1" if name == "wikitext103" else "wikitext-2-raw-v1"
        rows = readers.load_hf_dataset("wikitext", cfg, split=hf_split)
        # HF rows are the file's lines (with their "\n"); rejoin and split into articles
        pages = split_wikitext_articles("".join(r["text"] for r in rows))
    return [wikitext_detokenizer(p) for p in pages] if detokenize else pages


