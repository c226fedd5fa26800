"""
Serve FishAI models over HTTP: an OpenAI-compatible API (chat and completions, streaming, logprobs),
Prometheus metrics and a web chat, decoding with continuous batching.

Usage (copy-paste):

    python serve.py --model runs/quick/fishai-best.pt             # the main job's model: http://127.0.0.1:8000
    python serve.py --model checkpoints/fishai-best.pt            # a train.py run; the web chat is at /
    python serve.py --model fishai-int4.bin --port 8080 --api-key $KEY --max-batch 8
    python serve.py --model base=checkpoints/fishai-best.pt --model chat=checkpoints-sft/fishai-best.pt
    python serve.py --model checkpoints/fishai-best.pt --watch     # reload when train.py writes a new best

    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"model": "fishai-best", "messages": [{"role": "user", "content": "Hello!"}]}'

    # the official client
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    print(client.chat.completions.create(model="fishai-best", messages=[{"role": "user", "content": "Hi"}]))

    # lm-evaluation-harness against the server (log-likelihoods through /v1/completions echo + logprobs)
    lm_eval --model local-completions --tasks hellaswag --model_args \\
        model=fishai-best,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=tokenizer/,tokenizer_backend=huggingface

Endpoints: GET /health (200 when ready, 503 while loading), GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, GET /metrics (Prometheus), GET / (the web chat). Any load_model input works:
a .pt checkpoint, a quantized .bin (on its int8/int4 kernels) or an HF directory.

Requests join and leave a running decode batch at token boundaries (KV-cache rows, --max-batch;
a bounded queue answers 429 when full); a client that disconnects frees its row at the next token.
A long prompt is prefilled in pieces between decode steps of the running rows: at most --prefill-chunk
tokens a turn, and while rows decode, about --prefill-stall-steps of their turns' time (a decode
step with the server's work for its tokens); on a .bin on FishAI's CPU kernels a turn's piece runs
in the same call as the rows' decode step (a mixed batch).
Decoding runs in a thread per model, off the event loop. At temperature 0 a request gives the
same text streamed or not; with --deterministic also bitwise the same alone or among others (by
default a batch's matmuls may round a row differently from its lone run). Binds 127.0.0.1 unless --host says otherwise;
--api-key is checked as `Authorization: Bearer KEY` (/health, /metrics and the page stay public).

Isolation: every sampling field is checked before a request joins the batch (400 with the OpenAI
error body): numbers must be finite (no NaN or Infinity), temperature 0..2, top_p in (0, 1],
frequency_penalty and presence_penalty -2..2 (accepted, not applied), seed 0..2**64-1. A temperature
below MIN_TEMPERATURE (1e-3, e.g. 1e-300) decodes greedily, as 0 does: dividing logits by it would
overflow. Whatever still fails inside one request's row ends that request alone: streamed, an
SSE `data: {"error": {...}}` event then `data: [DONE]`; not streamed, a 500 with the error body.
A failed decode step ends the requests in it; queued requests go on. GET /health answers 503 when a
model's engine thread has died. SIGTERM or Ctrl-C stops accepting, ends in-flight requests with an
error event and exits within seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

import common
import cpu_kernels
from engine import TRUNK_PREFILL, Engine as DecodeEngine, cut_at_stop, sample_next
from model import CheckpointError, chat_training_warning, count_params, load_model
import text_tokenizer
from text_tokenizer import chat_stop_ids

DEFAULT_PORT = 8000
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-3  # below it sampling is greedy (see the module docstring)
MIN_PREFILL_CHUNK = 4  # the smallest adaptive prefill piece
# a prefill piece's length while streams decode, in their usual turns: their gap between tokens grows
# to ~(1 + K) turns (within 5x with room for this machine's noise) and a long prompt's first token
# comes after ~(1 + K) / K of its prefill time (docs/RESULTS.md)
STALL_STEPS = 2.0
MAX_SEED = 2**64 - 1    # torch.Generator.manual_seed's range
SWITCH_INTERVAL = 5e-4  # seconds: how long a thread may hold the GIL while another waits (serve_command)


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(description="Serve FishAI models: an OpenAI-compatible API with continuous "
                              "batching, Prometheus metrics and a web chat.")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a .pt checkpoint, quantized .bin or HF directory (repeatable: several models, listed in "
                        "/v1/models); NAME= sets its id (default: the file name without extension)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=common.int_flag(1, 65535), default=DEFAULT_PORT, help="port to listen on")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* (default: open)")
    p.add_argument("--max-batch", type=common.int_flag(1, 256), default=8,
                   help="requests decoded together per model (KV-cache rows)")
    p.add_argument("--max-queue", type=common.int_flag(1), default=64,
                   help="requests waiting for a row per model; one more is answered 429")
    p.add_argument("--max-n", type=common.int_flag(1), default=8, help="largest `n` (choices per request)")
    p.add_argument("--prefill-chunk", type=common.int_flag(1), default=256,
                   help="most prompt tokens prefilled per engine turn: a long prompt is prefilled in pieces "
                        "between decode steps, so running streams keep flowing")
    p.add_argument("--prefill-stall-steps", type=common.float_flag(0), default=STALL_STEPS, metavar="K",
                   help="while streams decode, a turn's prefill piece takes at most about K times what a turn "
                        "of theirs takes without one (the decode step and the server's work for its tokens, "
                        "measured as the server runs), so a stream's gap between tokens stays within ~K+1 times "
                        "its usual one; 0 = --prefill-chunk tokens whatever it costs")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant decoding: at temperature 0 a request gives bitwise the text it gives alone, "
                        "among any others. A .bin on FishAI's CPU kernels is so already; elsewhere every matmul runs "
                        "one row at a time (about half the batch throughput) and without it rows of a batch may "
                        "differ from their lone runs in the last bits (docs/RESULTS.md)")
    p.add_argument("--max-request-kb", type=common.int_flag(1), default=1024, help="largest request body, KB")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin (repeatable; default: no CORS)")
    p.add_argument("--watch", action="store_true",
                   help="reload a .pt model when its file is replaced (train.py writing a new fishai-best.pt), "
                        "between requests, never mid-stream")
    common.add_device_flag(p)
    common.add_dtype_flag(p, "model dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    common.add_dequantize_flag(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="server log level")
    return p


log = logging.getLogger("fishai.serve")


class ServeError(common.FishAIError):
    """A request the server refuses: an HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers  # e.g. Retry-After on a 429 or 503: when a client may try again

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# the models

@dataclass
class ServedModel:
    """One model the server answers for: the GPT, its tokenizer and what /v1/models says of it."""
    name: str
    path: Path
    gpt: object = None
    info: dict = field(default_factory=dict)
    fingerprint: str = ""
    mtime: float = 0.0

    def load(self, device, dtype, dequantize: bool) -> "ServedModel":
        gpt = load_model(self.path, device=device, dtype=dtype, dequantize=dequantize)
        if gpt.tokenizer is None:
            raise CheckpointError(f"{self.path}: the model has no tokenizer; save it with its tokenizer "
                                  "(train.py does) or serve an HF directory with tokenizer files")
        self.gpt, self.mtime = gpt, _mtime(self.path)
        quant = _quantization(gpt, self.path, dequantize)
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.path.is_dir() \
            else self.path.stat().st_size
        self.fingerprint = f"fishai-{_file_hash(self.path)[:12]}-{quant}"
        self.info = {"parameters": count_params(gpt.config), "context_length": gpt.config.max_seq_len,
                     "quantization": quant,
                     "file_bytes": size, "chat_trained": getattr(gpt, "stage", None) == "sft"}
        warning = chat_training_warning(gpt)
        if warning:
            log.warning("%s: %s; chat requests use the ChatML template", self.name, warning)
        return self


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.is_file() else max((f.stat().st_mtime for f in path.rglob("*")), default=0)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _quantization(gpt, path: Path, dequantize: bool) -> str:
    if common.file_kind(path) == "quantized":
        kinds = {type(m).__name__ for m in gpt.modules()}
        found = [k for k, n in (("int4", "Int4Linear"), ("int8", "Int8Linear"), ("fp16", "HalfLinear")) if n in kinds]
        return "dequantized" if dequantize else ("+".join(found) or "fp32")
    return "none"


def _kernels(gpt, quantization: str) -> str:
    """Which matmuls a quantized model's layers run on (for the load line): on a CPU, FishAI's
    kernels or torch's with the reason."""
    if quantization in ("none", "dequantized", "fp32"):
        return ""
    return f" on {cpu_kernels.status()}" if next(gpt.buffers()).device.type == "cpu" else ""


def model_specs(values: list[str]) -> list[ServedModel]:
    """--model [NAME=]PATH values -> ServedModel (not loaded); one-line errors for a missing path."""
    out, seen = [], set()
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or os.path.exists(value):
            name, path = "", value
        p = Path(path)
        if not p.exists():
            raise common.FishAIError(f"--model {value}: no such file or directory")
        name = name or (p.name if p.is_dir() else p.stem)
        base, k = name, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        out.append(ServedModel(name, p))
    return out


# ----------------------------------------------------------------------------------------------
# one request's decoding: sampling settings, stop handling, the text it streams

@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: set[int] = field(default_factory=set)
    logprobs: int | None = None         # top alternatives per token (0: the chosen token's only); None: off
    prompt_logprobs: bool = False       # completions echo + logprobs: the prompt tokens' log-probabilities


@dataclass
class Job:
    """One choice of one request, from the queue through its KV-cache row to its last token. The
    engine thread calls send(event) with ("token", text, token_info) / ("done", finish_reason); emit
    delivers a list of events to the request's handler."""
    prompt: list[int]
    sampling: Sampling
    emit: object
    decoder: object
    generator: torch.Generator
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    pos: int = 0
    next_token: int = 0
    generated: int = 0
    text: str = ""
    sent: int = 0
    stop_hit: bool = False              # a stop string ended it: nothing after it is ever sent
    first_token_at: float | None = None
    coalesce: bool = False              # not streamed: its tokens go to the event loop in one batch at the end
    prefilled: int = 0                  # prompt tokens already in its KV-cache row (chunked prefill)
    prompt_logits: list = field(default_factory=list)  # echo + logprobs: each prefill chunk's logits
    _buffer: list = field(default_factory=list)

    def send(self, event: tuple) -> None:
        """Hand an event to the request's handler (thread-safe). A request that is not streamed gets
        its tokens in one batch with its "done": one wake-up of the event loop instead of one a token."""
        if self.coalesce and event[0] == "token":
            self._buffer.append(event)
            return
        events, self._buffer = self._buffer + [event], []
        self.emit(events)

    def held_back(self) -> int:
        """How many trailing characters could still turn into a stop string (never sent early)."""
        return max((k for s in self.sampling.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def accept_text(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; returns (text now safe to send, whether a stop string ended it)."""
        self.text += piece
        if self.stop_hit:
            return "", True
        cut = len(cut_at_stop(self.text, self.sampling.stop))
        self.stop_hit = cut < len(self.text)
        end = cut if self.stop_hit else len(self.text) - self.held_back()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out, self.stop_hit


class QueueFull(ServeError):
    def __init__(self, name: str, limit: int):
        super().__init__(429, f"model {name}: {limit} requests are already waiting; retry later (--max-queue)",
                         code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"})


def next_piece(last: tuple | None, turn_s: float | None, stall_steps: float, chunk: int) -> int:
    """Prompt tokens for the next prefill piece while rows decode: the last piece (tokens, seconds)
    scaled to stall_steps decode turns of turn_s seconds, at most halved or doubled a turn, within
    MIN_PREFILL_CHUNK..chunk; 16 before anything is measured. A piece's time is not proportional
    to its tokens (a call's fixed cost; attention grows with the position), so the size follows
    the measured time, as a controller, rather than a tokens/s estimate."""
    if turn_s is None or last is None:
        return min(chunk, 16)
    tokens, took = last
    want = tokens * stall_steps * turn_s / max(took, 1e-9)
    return max(MIN_PREFILL_CHUNK, min(chunk, int(min(2 * tokens, max(tokens / 2, want)))))


class Engine:
    """Continuous batching for one model, in its own thread: waiting jobs are prefilled into free
    KV-cache rows, every step decodes one token for each active row (engine.Engine.step, rows
    0..n-1 at their own positions), and a finished or cancelled job's row is refilled by the last
    active one (engine.Engine.move_row), so the batch is always the first n rows; a prompt being
    prefilled chunk by chunk sits in row n, moved down when a row below it frees; where the engine has
    the C decode trunk, a turn's last piece runs in the decode step itself. A failure stays
    with its requests: a row whose prefill or sampling fails ends that request alone, a failed
    decode step the requests in that step; the queue goes on. `waiting` and `pending_model` are
    shared with the event loop and the --watch thread: they change only under `cond`."""

    def __init__(self, served: ServedModel, max_batch: int, max_queue: int, metrics: "Metrics",
                 prefill_chunk: int = 256, deterministic: bool = False, stall_steps: float = STALL_STEPS):
        self.served, self.max_batch, self.max_queue, self.metrics = served, max_batch, max_queue, metrics
        self.prefill_chunk, self.deterministic, self.stall_steps = prefill_chunk, deterministic, stall_steps
        self._turns = collections.deque(maxlen=32)  # seconds of the last decode turns without a prefill piece
        self._steps = collections.deque(maxlen=32)  # and of their decode steps alone
        self._turn_end = None   # when the last turn that decoded ended
        self._piece = None      # (tokens, seconds) of the last prefill piece, its seconds smoothed (_timed_piece)
        self.filling: Job | None = None  # the job whose prompt is being prefilled, in row len(self.active)
        self._filling_row = 0           # where its prefilled positions are (rows below it may free up)
        self.waiting: collections.deque = collections.deque()
        self.active: list[Job] = []     # the engine thread's own: rows 0..n-1 of the KV cache
        self.cond = threading.Condition()
        self.pending_model: ServedModel | None = None  # --watch: swapped in when no row is active
        self.stopping = False           # stop(): no new job; the running and queued ones end with an error
        self._kv: DecodeEngine | None = None  # the KV-cache rows and the step, for the served weights
        name = served.name  # the metric series of this model (labels() takes a lock: look them up once)
        self.m_queue, self.m_active = metrics.queue.labels(name), metrics.active.labels(name)
        self.m_ttft, self.m_tokens = metrics.ttft.labels(name), metrics.completion_tokens.labels(name)
        self.m_rate = metrics.tokens_per_s.labels(name)
        self.thread = threading.Thread(target=self._run, name=f"engine-{served.name}", daemon=True)
        self.thread.start()

    @property
    def dead(self) -> bool:
        """The thread ended without stop(): nothing decodes this model any more (/health says 503)."""
        return not self.thread.is_alive() and not self.stopping

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping or not self.thread.is_alive():
                raise ServeError(503, f"model {self.served.name}: the server is shutting down" if self.stopping
                                 else f"model {self.served.name}: its decoding thread died; restart the server",
                                 code="unavailable", kind="server_error")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(self.served.name, self.max_queue)
            self.waiting.append(job)
            self.m_queue.set(len(self.waiting))
            self.cond.notify()

    def swap(self, model: ServedModel) -> None:
        with self.cond:
            self.pending_model = model
            self.cond.notify()

    def stop(self) -> None:
        """End the thread after its current step; every job it holds gets an error event."""
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        reason = "the server is shutting down"
        try:
            while self._wait_for_work():
                try:
                    self._turn()
                except Exception as e:  # noqa: BLE001 - outside any one row (a reload, the decode setup)
                    log.exception("model %s: decoding failed", self.served.name)
                    self._fail_jobs(f"decoding failed: {type(e).__name__}: {e}", queued=True)
                self._update_gauges()
        except BaseException as e:  # noqa: BLE001 - the thread ends: /health turns 503, its requests end
            log.exception("model %s: the decoding thread died", self.served.name)
            reason = f"the decoding thread died: {type(e).__name__}"
        finally:
            self._fail_jobs(reason, queued=True)
            self._update_gauges()

    def _wait_for_work(self) -> bool:
        """Sleep until there is something to do; False once stop() was called."""
        with self.cond:
            while not (self.waiting or self.active or self.filling is not None or self.pending_model is not None
                       or self.stopping):
                self.cond.wait()
            return not self.stopping

    def _fail_jobs(self, message: str, queued: bool) -> None:
        """End the active jobs (and the queued ones too when `queued`) with an error event."""
        with self.cond:
            jobs, self.active = self.active, []
            if queued:
                jobs += list(self.waiting) + ([self.filling] if self.filling is not None else [])
                self.waiting.clear()
                self.filling = None
        self._kv = None  # a step that failed half-way may have left the cache inconsistent: a fresh one
        for job in jobs:
            job.send(("error", message))

    def _fail_job(self, job: Job, e: Exception) -> None:
        """End the one request whose own work (prefill, sampling, decoding its text) failed."""
        log.exception("model %s: a request failed", self.served.name)
        row = next((i for i, j in enumerate(self.active) if j is job), None)
        if row is not None:
            self._release(row)
        job.send(("error", f"the request failed: {type(e).__name__}: {e}"))

    def _update_gauges(self) -> None:
        self.m_active.set(len(self.active) + (self.filling is not None))
        with self.cond:
            self.m_queue.set(len(self.waiting))

    def _take(self) -> Job | None:
        """The next queued job when a row is free (none while a reload waits for the batch to drain)."""
        with self.cond:
            if not self.waiting or len(self.active) >= self.max_batch or self.pending_model is not None:
                return None
            job = self.waiting.popleft()
            self.m_queue.set(len(self.waiting))
            return job

    def _swap_if_due(self) -> None:
        with self.cond:  # between requests, never mid-stream
            fresh = self.pending_model if not self.active and self.filling is None else None
            if fresh is not None:
                self.pending_model = None
        if fresh is not None:
            self.served.gpt, self.served.info = fresh.gpt, fresh.info
            self.served.fingerprint, self.served.mtime = fresh.fingerprint, fresh.mtime
            log.info("model %s: reloaded %s", self.served.name, self.served.path)

    def _turn(self) -> None:
        self._swap_if_due()
        gpt = self.served.gpt
        if self._kv is None or self._kv.model is not gpt:  # first use, a reload or after a failed step
            self._kv = DecodeEngine(gpt, batch=self.max_batch, batch_invariant=self.deterministic)
            if self.filling is not None:  # a fresh cache: its prompt starts over
                self.filling.prefilled, self.filling.prompt_logits = 0, []
        self._drop_cancelled()
        t0 = time.perf_counter()
        prefilled, fused = self._prefill_some()
        prefill_s = time.perf_counter() - t0 if prefilled else 0.0
        stepped = bool(self.active)
        if stepped:
            try:
                self._step(fused)
            except Exception as e:  # noqa: BLE001 - the requests of this step end; the queue goes on
                log.exception("model %s: a decode step failed", self.served.name)
                why = f"decoding failed: {type(e).__name__}: {e}"
                if fused is not None:  # the prompt piece was in the step too
                    self.filling = None
                    fused[0].send(("error", why))
                self._fail_jobs(why, queued=False)
        # what the running streams wait between tokens without a prefill piece: the decode step and
        # the server's work around it (sampling, text, events, the other threads' share of the GIL),
        # end of turn to end of turn. On a small model that work is most of a turn: sizing pieces by
        # the bare step's time made them so short that a long prompt took ~3x its one-piece time.
        # Measured on turns without a piece, and their median (the mean follows the GIL's and the
        # collector's pauses): a piece is held to K of the streams' usual turns. Their gap while a
        # prompt is prefilled is then ~(1 + K) turns, and its prefill gets K / (1 + K) of the time.
        now = time.perf_counter()
        if stepped and self._turn_end is not None and (not prefill_s or not self._turns) and fused is None:
            self._turns.append(max(now - self._turn_end - prefill_s, 1e-9))
        self._turn_end = now if stepped else None

    def _prefill_some(self) -> tuple[int, tuple | None]:
        """Prefill up to --prefill-chunk prompt tokens this turn: short prompts join the batch at once
        (several a turn), a long one a chunk a turn, so the running rows get a decode step between
        its chunks instead of stalling for the whole prompt. The turn's last piece rides in the decode
        step itself where the engine can (its C decode trunk takes any tokens at any positions:
        vLLM's mixed batches), so the running rows' step costs the piece little more than its own
        rows. Returns (tokens prefilled here, the (job, tokens) piece left for the step, or None)."""
        budget = left = self._prefill_budget()
        while left > 0:
            if self.filling is None:
                self.filling = self._take()
                if self.filling is None:
                    break
                self._filling_row = len(self.active)
            job = self.filling
            if job.cancelled.is_set():
                self.filling = None
                continue
            n = min(len(job.prompt) - job.prefilled, left)
            if (self.active and self._kv.trunk is not None and n <= TRUNK_PREFILL and not job.sampling.prompt_logprobs
                    and (n == left or not self.waiting)):  # (a hint: a request arriving now waits a turn)
                return budget - left + n, (job, n)
            try:
                left -= self._prefill_chunk(job, left)
            except Exception as e:  # noqa: BLE001 - this request's prompt, not the batch
                self.filling = None
                self._fail_job(job, e)
        return budget - left, None

    def _prefill_budget(self) -> int:
        """Prompt tokens to prefill this turn: --prefill-chunk, and while rows decode about what fits in
        --prefill-stall-steps of their decode turns' time, by the last piece's measured time. Not
        with --deterministic: a prompt's pieces (and so its numbers) would then depend on the load."""
        if self.deterministic or not self.stall_steps or not self.active:
            return self.prefill_chunk
        turn = statistics.median_low(self._turns) if self._turns else None
        return next_piece(self._piece, turn, self.stall_steps, self.prefill_chunk)

    def _timed_piece(self, tokens: int, seconds: float) -> None:
        """Record a prefill piece for next_piece, its time per token averaged with the last piece's:
        one piece that ran fast by chance (the machine, the GIL) would make the next one too long."""
        if self._piece is not None:
            seconds = tokens * (seconds / tokens + self._piece[1] / self._piece[0]) / 2
        self._piece = (tokens, seconds)

    def _filling_row_now(self, job: Job) -> int:
        """The filling job's KV-cache row, len(self.active): moved down there when rows below it were
        freed since its last piece (the batch stays rows 0..n-1)."""
        row = len(self.active)
        if self._filling_row != row:
            self._kv.move_row(self._filling_row, row, job.prefilled)
            self._filling_row = row
        return row

    def _prefill_chunk(self, job: Job, budget: int) -> int:
        """The next `budget` tokens of the job's prompt into its row; returns how many."""
        row = self._filling_row_now(job)
        start, end = job.prefilled, min(len(job.prompt), job.prefilled + budget)
        ids = torch.tensor([job.prompt[start:end]], device=self._kv.device)
        t0 = time.perf_counter()
        logits = self._kv.step(ids, start, row=row, last_only=not job.sampling.prompt_logprobs)
        self._timed_piece(end - start, time.perf_counter() - t0)
        if job.sampling.prompt_logprobs:
            job.prompt_logits.append(logits[0])
            logits = logits[:, -1]
        self._piece_done(job, end, logits[0])
        return end - start

    def _piece_done(self, job: Job, end: int, last_logits: torch.Tensor) -> None:
        """The job's prompt is in its row up to `end`; when that is all of it, the job joins the batch."""
        job.prefilled = end
        if end == len(job.prompt):
            self.filling = None
            self._filling_row_now(job)  # (a fused piece's step may have freed rows below it)
            self._admit(job, last_logits)

    def _admit(self, job: Job, logits: torch.Tensor) -> None:
        """A job whose prompt is all in its row joins the decode batch; its first token comes from `logits`."""
        if job.sampling.prompt_logprobs:
            job.send(("prompt_logprobs", _prompt_logprobs(torch.cat(job.prompt_logits), job.prompt,
                                                         job.sampling.logprobs, self.served.gpt.tokenizer)))
            job.prompt_logits = []
        job.pos = len(job.prompt)
        self.active.append(job)
        if job.sampling.max_tokens == 0:
            self._finish(len(self.active) - 1, "length")
            return
        self._accept(len(self.active) - 1, logits)

    def _step(self, fused: tuple | None = None) -> None:
        """One decode step of the active rows, each at its own position; with `fused` = (job, n), the
        next n tokens of the filling job's prompt in the same call (Engine.step_tokens)."""
        device = self._kv.device
        B = len(self.active)
        t0 = time.perf_counter()
        if fused is None:
            tokens = torch.tensor([[j.next_token] for j in self.active], device=device)
            positions = torch.tensor([j.pos for j in self.active], device=device)  # each row at its own position
            logits = self._kv.step(tokens, positions).cpu()  # one copy for the batch (sampling runs on the CPU)
            took = max(time.perf_counter() - t0, 1e-9)
            self.m_rate.set(B / took)
            self._steps.append(took)
        else:
            job, n = fused
            row, start = self._filling_row_now(job), job.prefilled
            logits = self._kv.step_tokens([j.next_token for j in self.active] + job.prompt[start:start + n],
                                          [j.pos for j in self.active] + list(range(start, start + n)),
                                          list(range(B)) + [row] * n, list(range(B)) + [B + n - 1]).cpu()
            # the piece's share of the step: its time less a decode step's, so that a turn with a
            # fused piece takes about 1 + K of the streams' usual turns, as with a piece of its own
            step = statistics.median_low(self._steps) if self._steps else 0.0
            took = time.perf_counter() - t0
            self._timed_piece(n, max(took - step, took / 4))
        # the greedy rows' tokens in one op: every torch call lets the event loop's thread take the
        # GIL, and one argmax a row cost more than the step itself on a small model (~0.1 ms each)
        greedy = logits[:B].argmax(-1).tolist() if any(j.sampling.temperature <= 0 for j in self.active) else None
        for job in self.active:
            job.pos += 1
        for row in reversed(range(len(self.active))):  # reversed: _finish moves the last row into this one
            job = self.active[row]
            try:
                self._accept(row, logits[row], greedy[row] if greedy is not None else None)
            except Exception as e:  # noqa: BLE001 - this row's sampling or text: the other rows go on
                self._fail_job(job, e)
        if fused is not None:
            job = fused[0]
            try:
                self._piece_done(job, job.prefilled + fused[1], logits[B])
            except Exception as e:  # noqa: BLE001 - this request's first token, not the batch
                self.filling = None
                self._fail_job(job, e)

    def _accept(self, row: int, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample the next token of the job in `row` from its logits (a greedy row's: `greedy`, when the
        step picked it for the batch), emit its text, finish it when due."""
        job, tok_info = self.active[row], None
        s = job.sampling
        logits = logits.cpu()
        if greedy is not None and s.temperature <= 0:
            tok = greedy
        else:
            tok = int(sample_next(logits[None], s.temperature, s.top_k, s.top_p, job.generator)[0])
        if s.logprobs is not None:
            tok_info = _token_logprobs(logits, tok, s.logprobs, self.served.gpt.tokenizer)
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.m_ttft.observe(job.first_token_at - job.submitted)
        job.generated += 1
        self.m_tokens.inc()
        if tok in s.stop_ids:
            self._finish(row, "stop", tok_info)
            return
        text, stopped = job.accept_text(job.decoder.push(tok))
        if text or tok_info:
            job.send(("token", text, tok_info))
        if stopped:
            self._finish(row, "stop")
        elif job.generated >= s.max_tokens or job.pos + 1 >= self.served.gpt.config.max_seq_len:
            self._finish(row, "length")
        else:
            job.next_token = tok

    def _finish(self, row: int, reason: str, tok_info: dict | None = None) -> None:
        job = self.active[row]
        tail, hit = job.accept_text(job.decoder.flush())
        if not hit:  # no token follows: text held back for a stop string that can no longer come goes out
            tail, job.sent = tail + job.text[job.sent:], len(job.text)
        if tail or tok_info:
            job.send(("token", tail, tok_info))
        job.send(("done", "stop" if hit else reason))
        self._release(row)

    def _release(self, row: int) -> None:
        last = len(self.active) - 1
        if row != last:
            self._kv.move_row(last, row, self.active[last].pos)
            self.active[row] = self.active[last]
        self.active.pop()

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self.active))):
            if self.active[row].cancelled.is_set():
                self._release(row)


def _logprob_entry(lp: torch.Tensor, tok: int, top: int | None, tokenizer) -> dict:
    """One token's log-probability and the `top` most likely alternatives, from a row of log-probs."""
    alts = []
    if top:
        vals, ids = lp.topk(min(top, lp.numel()))
        alts = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(vals, ids)]
    return {"id": tok, "token": tokenizer.decode([tok]), "logprob": float(lp[tok]), "top": alts}


def _token_logprobs(logits: torch.Tensor, tok: int, top: int, tokenizer) -> dict:
    return _logprob_entry(F.log_softmax(logits, dim=-1), tok, top, tokenizer)


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int | None, tokenizer) -> list[dict | None]:
    """Per prompt token: log p(token | the tokens before it) and the top alternatives; None for the first."""
    lp = F.log_softmax(logits, dim=-1)  # (T, V): position i predicts token i + 1
    return [None] + [_logprob_entry(lp[i - 1], prompt[i], top, tokenizer) for i in range(1, len(prompt))]


# ----------------------------------------------------------------------------------------------
# metrics (Prometheus)

class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fishai_requests_total", "HTTP API requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("fishai_prompt_tokens_total", "prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("fishai_completion_tokens_total", "generated tokens", ["model"], registry=r)
        self.queue = Gauge("fishai_queue_depth", "requests waiting for a KV-cache row", ["model"], registry=r)
        self.active = Gauge("fishai_active_requests", "requests being decoded", ["model"], registry=r)
        self.ttft = Histogram("fishai_time_to_first_token_seconds", "submit to first token", ["model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens_per_s = Gauge("fishai_decode_tokens_per_second", "tokens/s of the last decode step (all rows)",
                                  ["model"], registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# ----------------------------------------------------------------------------------------------
# request checking: every user mistake is a 400 with the OpenAI error body, never a 500

def _field(body: dict, name: str, kinds, default=None, lo=None, hi=None):
    """body[name] checked against kinds (and a range); `default` when absent or null. Careful with
    falsy values: temperature 0 is greedy, not "unset". Python's JSON reader takes NaN and
    Infinity, which pass any range test (NaN compares false): numbers must be finite."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("boolean" if k is bool else "integer" if k is int else "number" if k is float
                            else "string" if k is str else "object" if k is dict else k.__name__ for k in kinds)
        article = "an" if names[0] in "aeiou" else "a"
        raise ServeError(400, f"'{name}' must be {article} {names} (got {json.dumps(value)[:40]})", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ServeError(400, f"'{name}' must be a finite number (got {value})", param=name)
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else \
            f"at least {lo}" if lo is not None else f"at most {hi}"
        raise ServeError(400, f"'{name}' must be {bounds} (got {value})", param=name)
    return value


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ServeError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    return [s for s in stop if s]


def sampling_from(body: dict, max_tokens_default: int, chat: bool) -> tuple[Sampling, int]:
    """(the request's sampling settings, n)."""
    max_tokens = _field(body, "max_completion_tokens", (int,), None, 0)
    max_tokens = _field(body, "max_tokens", (int,), max_tokens, 0)
    if chat:
        logprobs = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), 0, 0, MAX_LOGPROBS)
        logprobs = top if logprobs else None
    else:
        logprobs = _field(body, "logprobs", (int,), None, 0, MAX_LOGPROBS)
    temperature = float(_field(body, "temperature", (int, float), 1.0, 0, 2))
    s = Sampling(max_tokens=max_tokens_default if max_tokens is None else max_tokens,
                 temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                 top_p=_field(body, "top_p", (int, float), None, 0, 1), top_k=_field(body, "top_k", (int,), None, 0),
                 seed=_field(body, "seed", (int,), None, 0, MAX_SEED), stop=_stop_strings(body), logprobs=logprobs)
    if s.top_p is not None and s.top_p <= 0:
        raise ServeError(400, "'top_p' must be above 0", param="top_p")
    for name in ("frequency_penalty", "presence_penalty"):  # accepted (OpenAI's range), not applied
        _field(body, name, (int, float), None, -2, 2)
    return s, _field(body, "n", (int,), 1, 1)


def _message_text(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise ServeError(400, f"messages[{i}].content: only text parts are supported", param="messages")
        return "".join(parts)
    if not isinstance(content, str):
        raise ServeError(400, f"messages[{i}].content must be a string", param="messages")
    return content


def chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ServeError(400, f"messages[{i}]: role must be system, user or assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append({"role": role, "content": _message_text(m, i)})
    ids, _ = tokenizer.encode_chat(turns, add_generation_prompt=True)
    return list(ids)


def completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids or a list of such lists."""
    p = body.get("prompt")
    vocab = tokenizer.vocab_size
    if isinstance(p, str):
        return [tokenizer.encode(p)]
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        p = [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return [tokenizer.encode(x) for x in p]
    if isinstance(p, list) and p and all(isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in x) for x in p):
        return [list(x) for x in p]
    raise ServeError(400, "'prompt' must be a string, a list of strings, or (lists of) token ids below the "
                          f"vocabulary size {vocab}", param="prompt")


def check_context(prompt: list[int], max_tokens: int, context: int) -> None:
    need = len(prompt) + max_tokens
    if not prompt:
        raise ServeError(400, "the prompt is empty", param="prompt")
    if need > context:
        raise ServeError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is {need} tokens, "
                              f"{need - context} over the model's context of {context}; shorten the prompt or "
                              "lower max_tokens", param="max_tokens", code="context_length_exceeded")


# ----------------------------------------------------------------------------------------------
# the server: models, jobs, responses

class Server:
    def __init__(self, args, models: list[ServedModel], device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.models = {m.name: m for m in models}
        self.engines: dict[str, Engine] = {}
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failed: str | None = None
        self.on_fatal = lambda: None
        self.on_ready = lambda: None    # serve_command: says "serving ..." once the models are loaded

    def health(self) -> tuple[int, dict]:
        """GET /health: 200 when every model is loaded and decoding, 503 while loading or when an
        engine thread has died (its requests would wait forever: a supervisor should restart us)."""
        dead = [name for name, e in self.engines.items() if e.dead]
        if dead:
            return 503, {"status": "error", "dead_engines": dead}
        if self.ready.is_set():
            return 200, {"status": "ok", "models": list(self.models)}
        return 503, {"status": "loading"}

    def stop(self) -> None:
        """SIGTERM or Ctrl-C: every engine ends its requests with an error event and takes no more."""
        for engine in list(self.engines.values()):
            engine.stop()

    def load_all(self) -> None:
        """Load every model (the server answers /health with 503 meanwhile), then start its engine."""
        try:
            for m in self.models.values():
                t0 = time.time()
                m.load(self.device, self.dtype, self.args.dequantize)
                self.engines[m.name] = Engine(m, self.args.max_batch, self.args.max_queue, self.metrics,
                                              self.args.prefill_chunk, self.args.deterministic,
                                              self.args.prefill_stall_steps)
                log.info("model %s: %s loaded in %.1f s (%s%s, %s parameters, context %d)", m.name, m.path,
                         time.time() - t0, m.info["quantization"], _kernels(m.gpt, m.info["quantization"]),
                         f"{m.info['parameters']:,}", m.info["context_length"])
                if self.args.watch and m.path.is_file():
                    threading.Thread(target=self._watch, args=(m,), daemon=True).start()
            # what loading made (torch, the app, the tokenizers: ~10^5 objects) never becomes garbage:
            # out of the collector's sight, a full collection no longer walks it (tens of ms on a
            # decode turn, every stream's token late)
            gc.collect()
            gc.freeze()
            self.ready.set()
            self.on_ready()
        except Exception as e:  # noqa: BLE001 - a model that cannot load stops the server with one line
            self.failed = common.one_line(e)
            self.on_fatal()

    def _watch(self, m: ServedModel, every: float = 1.0) -> None:
        """--watch: when the file is replaced (train.py renames a new fishai-best.pt into place),
        load it here and let the engine swap it in between requests."""
        seen = m.mtime
        while True:
            time.sleep(every)
            try:
                now = _mtime(m.path)
                if now == seen:
                    continue
                seen = now
                fresh = ServedModel(m.name, m.path).load(self.device, self.dtype, self.args.dequantize)
                self.engines[m.name].swap(fresh)
            except Exception as e:  # noqa: BLE001 - keep serving the old weights
                log.warning("model %s: reload of %s failed (%s); still serving the previous weights", m.name,
                            m.path, common.one_line(e))

    def served(self, body: dict) -> ServedModel:
        if not self.ready.is_set():
            raise ServeError(503, "the models are still loading; retry shortly (GET /health says when ready)",
                             code="loading", kind="server_error")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ServeError(400, "'model' is required: one of " + ", ".join(self.models), param="model")
        if name not in self.models:
            raise ServeError(404, f"the model '{name}' does not exist; available: {', '.join(self.models)}",
                             param="model", code="model_not_found")
        return self.models[name]

    def submit(self, served: ServedModel, prompts: list[list[int]], sampling: Sampling, n: int,
               stream: bool = False):
        """One Job per (prompt, choice), all emitting (index, [events]) into one asyncio queue."""
        if n > self.args.max_n:
            raise ServeError(400, f"'n' is at most {self.args.max_n} here (--max-n)", param="n")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for i, (prompt, k) in enumerate((p, k) for p in prompts for k in range(n)):
            seed = (sampling.seed + k) % (MAX_SEED + 1) if sampling.seed is not None else secrets.randbits(62)
            emit = (lambda idx: lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (idx, ev)))(i)
            jobs.append(Job(prompt, sampling, emit, text_tokenizer.IncrementalDecoder(served.gpt.tokenizer),
                            torch.Generator().manual_seed(seed), coalesce=not stream))
        engine = self.engines[served.name]
        try:
            for job in jobs:
                engine.submit(job)
        except QueueFull:
            for job in jobs:
                job.cancelled.set()
            raise
        for prompt in prompts:
            self.metrics.prompt_tokens.labels(served.name).inc(len(prompt))
        return jobs, queue


async def read_body(request, limit: int) -> dict:
    raw = await request.body()
    if len(raw) > limit:
        raise ServeError(413, f"the request body is {len(raw):,} bytes, over the limit of {limit:,} (--max-request-kb)")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ServeError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    return body


async def events(request, jobs: list[Job], queue: asyncio.Queue):
    """(index, event) from the jobs until every one is done; a disconnected client cancels them."""
    remaining = len(jobs)
    try:
        while remaining:
            try:  # what has arrived is taken at once; a wait (with a disconnect check) only when nothing has
                idx, evs = queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    idx, evs = await asyncio.wait_for(queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            for ev in evs:
                if ev[0] == "error":
                    raise ServeError(500, ev[1], kind="server_error")
                remaining -= ev[0] == "done"
                yield idx, ev
    finally:
        for job in jobs:
            job.cancelled.set()  # no-op for finished jobs; frees the row of an abandoned one


def _usage(prompts, jobs) -> dict:
    p, c = sum(len(x) for x in prompts), sum(j.generated for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat_logprob(info: dict) -> dict:
    def entry(tok, lp):
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
    return {**entry(info["token"], info["logprob"]), "top_logprobs": [entry(t, v) for t, v in info["top"]]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _open_request(server: Server, request):
    """A request's JSON body, the model it names, that model's tokenizer and context length."""
    body = await read_body(request, server.args.max_request_kb * 1024)
    m = server.served(body)
    return body, m, m.gpt.tokenizer, m.info["context_length"]


def _stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, a final usage chunk: stream_options.include_usage)."""
    stream = _field(body, "stream", (bool,), False)
    return stream, stream and bool((_field(body, "stream_options", (dict,), {}) or {}).get("include_usage"))


async def chat_completions(server: Server, request):
    body, m, tok, ctx = await _open_request(server, request)
    prompt = chat_prompt(body, tok)
    sampling, n = sampling_from(body, max(1, ctx - len(prompt)), chat=True)
    sampling.stop_ids = set(chat_stop_ids(tok))
    check_context(prompt, sampling.max_tokens, ctx)
    stream, usage_chunk = _stream_flags(body)
    jobs, queue = server.submit(m, [prompt], sampling, n, stream)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": m.name,
            "system_fingerprint": m.fingerprint}
    if stream:
        return _streaming(_chat_chunks(request, head, jobs, queue, [prompt], usage_chunk))
    texts, infos, reasons = [""] * len(jobs), [[] for _ in jobs], [None] * len(jobs)
    async for idx, ev in events(request, jobs, queue):
        if ev[0] == "token":
            texts[idx] += ev[1]
            infos[idx] += [_chat_logprob(ev[2])] if ev[2] else []
        elif ev[0] == "done":
            reasons[idx] = ev[1]
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": infos[i]} if sampling.logprobs is not None else None,
                "finish_reason": reasons[i]} for i in range(len(jobs))]
    return {**head, "object": "chat.completion", "choices": choices, "usage": _usage([prompt], jobs)}


async def _chat_chunks(request, head, jobs, queue, prompts, usage_chunk):
    base = {**head, "object": "chat.completion.chunk"}
    for i in range(len(jobs)):  # the role comes first, once per choice
        yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    async for idx, ev in events(request, jobs, queue):
        if ev[0] == "token":
            lp = {"content": [_chat_logprob(ev[2])]} if ev[2] else None
            yield _sse({**base, "choices": [{"index": idx, "delta": {"content": ev[1]}, "logprobs": lp,
                                             "finish_reason": None}]})
        elif ev[0] == "done":
            yield _sse({**base, "choices": [{"index": idx, "delta": {}, "logprobs": None, "finish_reason": ev[1]}]})
    if usage_chunk:
        yield _sse({**base, "choices": [], "usage": _usage(prompts, jobs)})
    yield "data: [DONE]\n\n"


def _completion_logprobs(entries: list) -> dict:
    """The legacy completions logprobs object over prompt (echo) and generated tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append(dict(e["top"]) if e.get("top") is not None and e["logprob"] is not None else None)
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


async def completions(server: Server, request):
    body, m, tok, ctx = await _open_request(server, request)
    prompts = completion_prompts(body, tok)
    sampling, n = sampling_from(body, 16, chat=False)  # OpenAI's completions default: 16 tokens
    sampling.stop_ids = {tok.eos_id} if tok.eos_id is not None else set()
    echo = _field(body, "echo", (bool,), False)
    sampling.prompt_logprobs = echo and sampling.logprobs is not None
    for p in prompts:
        check_context(p, sampling.max_tokens, ctx)
    stream, usage_chunk = _stream_flags(body)
    jobs, queue = server.submit(m, prompts, sampling, n, stream)
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": m.name, "system_fingerprint": m.fingerprint}
    if stream:
        return _streaming(_completion_chunks(request, head, jobs, queue, prompts, usage_chunk, echo, tok))
    texts = [tok.decode(jobs[i].prompt) if echo else "" for i in range(len(jobs))]
    entries, reasons = [[] for _ in jobs], [None] * len(jobs)
    async for idx, ev in events(request, jobs, queue):
        if ev[0] == "prompt_logprobs":
            entries[idx] = [{"token": tok.decode([t]), "logprob": None, "top": None} if e is None else e
                            for t, e in zip(jobs[idx].prompt, ev[1])]
        elif ev[0] == "token":
            texts[idx] += ev[1]
            entries[idx] += [ev[2]] if ev[2] else []
        elif ev[0] == "done":
            reasons[idx] = ev[1]
    choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                "logprobs": _completion_logprobs(entries[i]) if sampling.logprobs is not None else None}
               for i in range(len(jobs))]
    return {**head, "choices": choices, "usage": _usage(prompts, jobs)}


async def _completion_chunks(request, head, jobs, queue, prompts, usage_chunk, echo, tok):
    def chunk(idx, text, info, reason=None):
        lp = _completion_logprobs([info]) if info else None
        return _sse({**head, "choices": [{"index": idx, "text": text, "logprobs": lp, "finish_reason": reason}]})
    if echo:
        for i, job in enumerate(jobs):
            yield chunk(i, tok.decode(job.prompt), None)
    async for idx, ev in events(request, jobs, queue):
        if ev[0] == "token":
            yield chunk(idx, ev[1], ev[2])
        elif ev[0] == "done":
            yield chunk(idx, "", None, ev[1])
    if usage_chunk:
        yield _sse({**head, "choices": [], "usage": _usage(prompts, jobs)})
    yield "data: [DONE]\n\n"


def _streaming(gen):
    from starlette.responses import StreamingResponse
    return StreamingResponse(_ending_with_error_event(gen), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _ending_with_error_event(gen):
    """A stream's headers (200) are already sent when its request fails: the failure goes to the
    client as an OpenAI error event and the stream still ends with [DONE], never cut mid-way."""
    try:
        async for piece in gen:
            yield piece
    except ServeError as e:
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - a bug in one stream: its client is told, the server goes on
        log.exception("internal error in a stream")
        yield _sse(ServeError(500, f"internal error: {type(e).__name__}", kind="server_error").body())
        yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------
# the app

def build_app(server: Server):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="FishAI Train server", docs_url=None, redoc_url=None, openapi_url=None)
    if server.args.cors_origin:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=server.args.cors_origin, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error(e: ServeError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):  # FastAPI's own 422 body, as an OpenAI 400
        return error(ServeError(400, f"invalid request: {str(e)[:200]}"))

    @app.exception_handler(HTTPException)
    async def _http(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(ServeError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind=kind))

    @app.exception_handler(Exception)
    async def _bug(request, e):
        log.exception("internal error")
        return error(ServeError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") and server.args.api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {server.args.api_key}".encode()):
                server.metrics.requests.labels(path, "401").inc()
                return error(ServeError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                        code="invalid_api_key", kind="authentication_error"))
        response = await call_next(request)
        if path.startswith("/v1/"):
            server.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        if not server.ready.is_set():
            raise ServeError(503, "the models are still loading", code="loading", kind="server_error")
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": int(m.mtime),
                                            "owned_by": "fishai", **m.info} for m in server.models.values()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completions(server, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await completions(server, request)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return CHAT_PAGE

    return app


# the web chat: one static page, no build step; it streams from /v1/chat/completions
CHAT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FishAI chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 1rem auto; padding: 0 1rem; color: #222; }
header { display: flex; flex-wrap: wrap; gap: .6rem; align-items: center; }
#messages { border: 1px solid #ccc; border-radius: 6px; padding: .6rem; min-height: 16rem; margin: .8rem 0;
            overflow-y: auto; max-height: 60vh; }
.msg { white-space: pre-wrap; margin: .4rem 0; padding: .4rem .6rem; border-radius: 6px; }
.user { background: #e8f0fe; } .assistant { background: #f4f4f4; }
.dropped { opacity: .45; } #context-note { color: #555; font-style: italic; }
#notice { color: #8a5300; } #speed { color: #555; font-size: .9rem; } #error { color: #b00020; }
textarea { width: 100%; box-sizing: border-box; }
</style></head><body>
<header>
  <strong>FishAI chat</strong>
  <label>model <select id="model"></select></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7" size="4"></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" value="" size="5" placeholder="auto"
    title="blank: as many as fit in the model's context after the conversation"></label>
  <label>API key <input id="api-key" type="password" size="10" placeholder="if required"></label>
</header>
<div id="notice"></div>
<div id="context-note"></div>
<div id="messages"></div>
<textarea id="input" rows="3" placeholder="Write a message (Enter sends, Shift+Enter: new line)"></textarea>
<p><button id="send">Send</button> <button id="stop" disabled>Stop</button> <button id="clear">Clear</button>
<span id="speed"></span> <span id="error"></span></p>
<script>
const $ = (id) => document.getElementById(id);
let models = [], history = [], controller = null, dropped = 0;  // history: {role, content, el}
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("api-key").value) h["Authorization"] = "Bearer " + $("api-key").value;
  return h;
}
function notice() {
  const m = models.find((x) => x.id === $("model").value);
  $("notice").textContent = m && !m.chat_trained ?
    "This model was never chat-trained (train.py --stage sft): replies follow the ChatML template only loosely." : "";
}
async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (!r.ok) { $("error").textContent = "cannot list models: HTTP " + r.status; return; }
  $("error").textContent = "";
  models = (await r.json()).data;
  $("model").innerHTML = models.map((m) => `<option value="${m.id}">${m.id} (${m.quantization})</option>`).join("");
  notice();
}
function bubble(role, text) {
  const d = document.createElement("div");
  d.className = "msg " + role; d.textContent = text; $("messages").appendChild(d); return d;
}
// The conversation outgrew the model's context: leave out its oldest turn (a user message and the
// replies after it), grey it out and say so; the newest message always stays.
function dropOldestTurn() {
  do { const m = history.shift(); m.el.classList.add("dropped"); dropped++; }
  while (history.length > 1 && history[0].role !== "user");
  const m = models.find((x) => x.id === $("model").value);
  $("context-note").textContent = `${dropped} earlier message${dropped === 1 ? "" : "s"} no longer fit the ` +
    `model's context of ${m ? m.context_length : "?"} tokens and ${dropped === 1 ? "is" : "are"} left out (greyed).`;
}
async function request(signal) {
  for (;;) {
    const body = {model: $("model").value, messages: history.map((m) => ({role: m.role, content: m.content})),
      stream: true, stream_options: {include_usage: true}, temperature: parseFloat($("temperature").value)};
    const max = parseInt($("max-tokens").value);
    if (max > 0) body.max_tokens = max;  // blank: the server gives the reply what the context has left
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), signal,
                                                   body: JSON.stringify(body)});
    if (r.ok) return r;
    const err = (await r.json()).error;
    if (err.code !== "context_length_exceeded" || history.length < 2) throw new Error(err.message);
    dropOldestTurn();
  }
}
async function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = ""; $("error").textContent = ""; $("speed").textContent = "";
  history.push({role: "user", content: text, el: bubble("user", text)});
  const out = bubble("assistant", "");
  controller = new AbortController(); $("stop").disabled = false; $("send").disabled = true;
  const t0 = performance.now(); let tokens = 0, reply = "";
  try {
    let r;
    try { r = await request(controller.signal); }
    catch (e) { if (e.name === "AbortError") throw e; $("error").textContent = e.message; history.pop(); out.remove(); return; }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\\n\\n")) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);  // the server failed mid-stream
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; if (!chunk.usage) tokens++; }
        }
        $("messages").scrollTop = $("messages").scrollHeight;
        const s = (performance.now() - t0) / 1000;
        $("speed").textContent = `${tokens} tokens, ${(tokens / Math.max(s, 1e-3)).toFixed(1)} tokens/s`;
      }
    }
    history.push({role: "assistant", content: reply, el: out});
    out.dataset.done = "1";
  } catch (e) {
    if (e.name === "AbortError") { history.push({role: "assistant", content: reply, el: out}); out.dataset.done = "1"; }
    else $("error").textContent = e.message || String(e);
  } finally {
    controller = null; $("stop").disabled = true; $("send").disabled = false;
  }
}
$("send").onclick = send;
$("stop").onclick = () => controller && controller.abort();
$("clear").onclick = () => { history = []; dropped = 0; $("messages").innerHTML = ""; $("context-note").textContent = ""; };
$("model").onchange = notice;
$("api-key").onchange = loadModels;
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
loadModels();
</script></body></html>
"""


def check_port(host: str, port: int) -> None:
    """One clear line (not a uvicorn traceback) when the address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise common.FishAIError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pick another "
                                     "--port or stop the process using it") from None


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    models = model_specs(args.model)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    check_port(args.host, args.port)
    # The engine threads and the event loop share the GIL: a thread back from the C kernels waits for
    # it until the loop's thread blocks or Python's switch interval (5 ms) runs out, so one busy moment
    # of the loop (a burst of events) stretched a decode turn by milliseconds. 0.5 ms bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL)
    server = Server(args, models, device, dtype)
    import uvicorn

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: in-flight streams get an error event and end
            super().handle_exit(sig, frame)
            # (a thread: the signal handler may have interrupted the event loop inside an engine's lock)
            threading.Thread(target=server.stop, name="stop", daemon=True).start()

    # timeout_graceful_shutdown: a connection that does not close after its error event is dropped
    uv = Uvicorn(uvicorn.Config(build_app(server), host=args.host, port=args.port, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=3))
    server.on_fatal = lambda: setattr(uv, "should_exit", True)
    server.on_ready = lambda: _log_serving(uv, server, args)
    threading.Thread(target=server.load_all, name="load", daemon=True).start()
    try:
        uv.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        log.info("stopped (Ctrl-C)")
        return common.EXIT_INTERRUPTED
    if server.failed:
        raise common.FishAIError(server.failed)
    return common.EXIT_OK


def _log_serving(uv, server: Server, args) -> None:
    """Say where the server answers once it can: its models are loaded and uvicorn listens."""
    deadline = time.time() + 30
    while not uv.started and not uv.should_exit and time.time() < deadline:
        time.sleep(0.05)
    if uv.started and not uv.should_exit:
        log.info("serving %s on http://%s:%d (web chat at /, API at /v1)", ", ".join(server.models), args.host,
                 args.port)


def main(argv=None) -> int:
    return common.run_cli(serve_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
