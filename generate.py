"""
Sample text from, or chat with, a FishAI model.

Any model that model.load_model accepts works: a training checkpoint (.pt), a quantized
export (.bin) or a FishAI/HF Llama directory. The tokenizer always comes from the model,
so a single file is enough.

Usage (copy-paste):

    # continue a prompt, streaming tokens to the terminal as they are produced
    python generate.py --model checkpoints/fishai-best.pt --prompt "Once upon a time"

    # greedy decoding (temperature 0), 100 new tokens
    python generate.py --model checkpoints/fishai-best.pt --prompt "The capital of France" \
        --temperature 0 --max-new-tokens 100

    # three samples in one batch, reproducible
    python generate.py --model fishai-int4.bin --prompt "def fib(n):" --num-samples 3 --seed 42

    # prompt from stdin
    echo "In 1905, Einstein" | python generate.py --model checkpoints/fishai-best.pt --prompt -

    # interactive multi-turn chat (SFT model), /help lists the commands
    python generate.py --model checkpoints/fishai-sft.pt --chat --system "You are a helpful assistant."

    # scripted chat: one user message per line, one reply per message on stdout
    printf 'Hello!\nWhat is 2+2?\n' | python generate.py --model checkpoints/fishai-sft.pt --chat

    # CUDA: static KV cache + torch.compile'd decode step (the first call compiles, then it is fast)
    python generate.py --model checkpoints/fishai-best.pt --prompt "Hello" --device cuda --compile

Plain generation prints the prompt followed by the continuation; generation stops at the
tokenizer's end-of-text token or after --max-new-tokens. Chat replies stop at <|im_end|>.
Timing figures go to stderr so stdout stays clean for scripts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO

import torch

# A token stream maps a (B, T) prompt to an iterator of (B,) new-token tensors, one per step.
# model.generate_stream is the default; tests inject fake streams to check the stop logic.
TokenStream = Callable[[torch.Tensor], Iterator[torch.Tensor]]

CHAT_HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), "
    "/history (show the conversation), /help, /quit (or /exit, Ctrl-D)"
)


# ----------------------------------------------------------------------------------------------
# incremental detokenization


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that are safe to print.

    Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character (Chinese,
    emoji...), and decoding such a prefix yields U+FFFD. We therefore only emit text once the
    pending tokens decode without a trailing U+FFFD. To stay O(n) we decode a small window
    (the approach of vLLM/TGI): `prefix` marks the start of the window, which always lies on a
    character boundary, and `read` the end of the text that was already emitted.
    """

    def __init__(self, tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly printable text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Return whatever is still pending (possibly ending in U+FFFD if the model produced
        invalid UTF-8), so that all pieces together equal decode(all ids)."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]


# ----------------------------------------------------------------------------------------------
# token generation


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator | None:
    """A torch.Generator on the model's device, or None when no seed is given."""
    if seed is None:
        return None
    dev = torch.device(device)
    gen = torch.Generator(device=dev.type if dev.type != "cpu" else "cpu")
    gen.manual_seed(seed)
    return gen


def model_token_stream(model, *, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None, compile: bool = False,
                       use_compile: bool = True) -> TokenStream:
    """The default token stream: model.generate_stream. With compile=True the decode steps run on
    a static KV cache through a torch.compile'd step (model.compile_decode): made once per batch
    size and kept across calls (chat turns), so a CUDA graph's buffers stay put.
    use_compile=False runs the same static-cache loop eagerly."""
    def stream(idx):
        if compile and (model._decode_fn is None or getattr(model, "_cache_batch", 0) != idx.shape[0]):
            model.compile_decode(idx.shape[0], use_compile=use_compile)
        # eos_id=None: stopping is decided in stream_generate, which knows every stop id
        # (<|endoftext|> and <|im_end|> in chat), not just one.
        return model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     eos_id=None, generator=generator)
    return stream


def stream_generate(model, prompt_ids: list[int], max_new_tokens: int = 200, *,
                    temperature: float = 0.8, top_k: int | None = 200, top_p: float | None = None,
                    stop_ids: Iterable[int] | None = None, num_samples: int = 1,
                    generator: torch.Generator | None = None, compile: bool = False,
                    token_stream: TokenStream | None = None) -> Iterator[list[int | None]]:
    """Generate `num_samples` continuations of `prompt_ids` as one batch.

    Yields, per decoding step, a list with one entry per sample: the new token id, or None once
    that sample has produced a stop token (the stop token itself is yielded, then None). Stops
    as soon as every sample is done or after max_new_tokens steps. stop_ids defaults to the
    tokenizer's EOS id. Pass `token_stream` to replace the model's decode loop (tests).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one token (e.g. the EOS id)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_new_tokens <= 0:
        return
    if stop_ids is None:
        tok = getattr(model, "tokenizer", None)
        eos = getattr(tok, "eos_id", None)
        stop_ids = [] if eos is None else [eos]
    stops = {int(s) for s in stop_ids}
    device = next(model.parameters()).device
    idx = torch.tensor([list(prompt_ids)] * num_samples, dtype=torch.long, device=device)
    if token_stream is None:
        token_stream = model_token_stream(model, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=generator, compile=compile)
    done = [False] * num_samples
    steps = 0
    stream = token_stream(idx)
    try:
        for new in stream:
            new = new.view(-1).tolist()
            out: list[int | None] = []
            for i, t in enumerate(new[:num_samples]):
                if done[i]:
                    out.append(None)
                    continue
                out.append(int(t))
                if int(t) in stops:
                    done[i] = True
            yield out
            steps += 1
            if all(done) or steps >= max_new_tokens:
                break
    finally:
        # Closing the model's generator lets it release its KV cache promptly.
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def generate_samples(model, prompt_ids: list[int], max_new_tokens: int = 200, *,
                     stop_ids: Iterable[int] | None = None, keep_stop: bool = False,
                     **kwargs) -> list[list[int]]:
    """Non-streaming helper: the new token ids of every sample (stop tokens dropped unless
    keep_stop). Takes the same keyword arguments as stream_generate."""
    if stop_ids is None:
        eos = getattr(getattr(model, "tokenizer", None), "eos_id", None)
        stop_ids = [] if eos is None else [eos]
    stops = {int(s) for s in stop_ids}
    num_samples = kwargs.get("num_samples", 1)
    rows: list[list[int]] = [[] for _ in range(num_samples)]
    for step in stream_generate(model, prompt_ids, max_new_tokens, stop_ids=stops, **kwargs):
        for i, t in enumerate(step):
            if t is not None and (keep_stop or t not in stops):
                rows[i].append(t)
    return rows


def stream_text(tokenizer, steps: Iterable[list[int | None]], stop_ids: Iterable[int] = (),
                sample: int = 0, ids_out: list[int] | None = None) -> Iterator[str]:
    """Printable text pieces of one sample of a stream_generate() stream; stop tokens are not
    printed. If ids_out is given, the sample's new (non-stop) token ids are appended to it."""
    stops = {int(s) for s in stop_ids}
    dec = IncrementalDecoder(tokenizer)
    for step in steps:
        t = step[sample]
        if t is None or t in stops:
            continue
        if ids_out is not None:
            ids_out.append(t)
        piece = dec.push(t)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, max_seq_len: int,
               warn: Callable[[str], None] | None = None) -> tuple[list[int], int]:
    """Make prompt + generation fit the model's context: cap the number of new tokens and, if
    the prompt alone fills the context, keep only its most recent tokens."""
    keep = max(1, max_seq_len - max(1, min(max_new_tokens, max_seq_len // 2)))
    if len(prompt_ids) > keep and len(prompt_ids) + max_new_tokens > max_seq_len:
        if warn:
            warn(f"prompt has {len(prompt_ids)} tokens; keeping the last {keep} to fit the "
                 f"{max_seq_len}-token context")
        prompt_ids = prompt_ids[-keep:]
    budget = max_seq_len - len(prompt_ids)
    if max_new_tokens > budget:
        if warn:
            warn(f"--max-new-tokens {max_new_tokens} does not fit the {max_seq_len}-token context "
                 f"after a {len(prompt_ids)}-token prompt; generating at most {budget}")
        max_new_tokens = budget
    return prompt_ids, max_new_tokens


# ----------------------------------------------------------------------------------------------
# chat


def chat_stop_ids(tokenizer) -> list[int]:
    """<|im_end|> ends an assistant turn; <|endoftext|> also stops a model that never learned it."""
    ids = [getattr(tokenizer, "im_end_id", None), getattr(tokenizer, "eos_id", None)]
    return [i for i in ids if i is not None]


def trim_history(tokenizer, messages: list[dict], reserve: int, max_seq_len: int) -> tuple[list[int], int]:
    """Encode `messages` with the chat template (generation prompt added), dropping the oldest
    user/assistant turns (never the system prompt or the newest message) until the prompt plus
    `reserve` reply tokens fits in max_seq_len. Mutates `messages`; returns (prompt ids, number
    of user turns dropped)."""
    dropped = 0
    start = 1 if messages and messages[0].get("role") == "system" else 0
    while True:
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        if len(ids) + reserve <= max_seq_len or len(messages) - start <= 1:
            return list(ids), dropped
        # drop one turn: the oldest user message and the replies that followed it
        del messages[start]
        dropped += 1
        while len(messages) - start > 1 and messages[start].get("role") != "user":
            del messages[start]


def chat_loop(model, input_stream: TextIO, output_stream: TextIO, *, system: str | None = None,
              max_new_tokens: int = 256, temperature: float = 0.7, top_k: int | None = 50,
              top_p: float | None = 0.9, generator: torch.Generator | None = None,
              compile: bool = False, interactive: bool = False, err_stream: TextIO | None = None,
              token_stream: TokenStream | None = None) -> list[dict]:
    """Multi-turn chat. Reads one user message per line from input_stream, streams each reply to
    output_stream (ended by a newline) and keeps the history, trimming the oldest turns when
    the context would overflow (a notice goes to err_stream). Lines starting with '/' are
    commands (see CHAT_HELP). In interactive mode the user is prompted with 'you> ' and
    replies are prefixed with 'fish> '; otherwise stdout carries only the replies, which keeps
    piped use scriptable. Returns the final message history."""
    err = err_stream if err_stream is not None else sys.stderr
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer attached; load it with model.load_model")
    stops = chat_stop_ids(tok)
    max_seq_len = model.config.max_seq_len
    # Room kept for the reply when deciding how much history fits; at most half the context so
    # a long --max-new-tokens does not wipe out the whole conversation.
    reserve = max(1, min(max_new_tokens, max_seq_len // 2))

    def notice(msg: str) -> None:
        print(f"[{msg}]", file=err, flush=True)

    def fresh() -> list[dict]:
        return [{"role": "system", "content": system}] if system else []

    def read_line() -> str | None:
        if interactive and input_stream is sys.stdin:
            try:
                return input("you> ")  # readline editing and history in a terminal
            except EOFError:
                return None
        if interactive:
            output_stream.write("you> ")
            output_stream.flush()
        line = input_stream.readline()
        return None if line == "" else line

    messages = fresh()
    if interactive:
        name = os.path.basename(str(getattr(model, "source", "") or "FishAI"))
        notice(f"chatting with {name} ({max_seq_len}-token context); " + CHAT_HELP)
    while True:
        line = read_line()
        if line is None:
            if interactive:
                output_stream.write("\n")
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            cmd = cmd.lower()
            if cmd in ("/quit", "/exit", "/q"):
                break
            if cmd == "/reset":
                messages = fresh()
                notice("conversation reset")
            elif cmd == "/system":
                system = rest.strip() or None
                messages = fresh()
                notice("system prompt " + ("set" if system else "cleared") + "; conversation reset")
            elif cmd == "/history":
                for m in messages:
                    print(f"{m['role']}: {m['content']}", file=err)
                err.flush()
            elif cmd == "/help":
                notice(CHAT_HELP)
            else:
                notice(f"unknown command {cmd}; " + CHAT_HELP)
            continue

        messages.append({"role": "user", "content": text})
        ids, dropped = trim_history(tok, messages, reserve, max_seq_len)
        if dropped:
            notice(f"history trimmed: dropped the {dropped} oldest turn(s) to fit the "
                   f"{max_seq_len}-token context")
        if len(ids) >= max_seq_len:
            messages.pop()
            notice(f"message too long: {len(ids)} tokens with the chat template, the context is "
                   f"{max_seq_len}; not sent")
            continue
        budget = min(max_new_tokens, max_seq_len - len(ids))
        if interactive:
            output_stream.write("fish> ")
            output_stream.flush()
        reply_ids: list[int] = []
        steps = stream_generate(model, ids, budget, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop_ids=stops, generator=generator,
                                compile=compile, token_stream=token_stream)
        try:
            for piece in stream_text(tok, steps, stop_ids=stops, ids_out=reply_ids):
                output_stream.write(piece)
                output_stream.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            notice("reply interrupted")
        finally:
            steps.close()
        output_stream.write("\n")
        output_stream.flush()
        messages.append({"role": "assistant", "content": tok.decode(reply_ids, skip_special=True)})
    return messages


# ----------------------------------------------------------------------------------------------
# command line


def resolve_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype | None:
    if name == "auto":
        # bf16 halves memory traffic on GPUs that support it; CPUs keep the checkpoint's fp32.
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Sample text from, or chat with, a FishAI model (.pt checkpoint, quantized "
                    ".bin or HF directory). Tokens are streamed to stdout as they are produced.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="checkpoints/fishai-best.pt",
                   help="model to load: training checkpoint (.pt), quantized export (.bin) or "
                        "FishAI/HF Llama directory")
    p.add_argument("--prompt", default="",
                   help="text to continue; '-' reads it from stdin; empty starts a fresh document")
    p.add_argument("--chat", action="store_true",
                   help="interactive multi-turn chat with the tokenizer's chat template "
                        "(one user message per line when stdin is piped)")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="maximum number of tokens to generate (per chat reply with --chat)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy decoding")
    p.add_argument("--top-k", type=int, default=200,
                   help="sample only from the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: smallest token set with cumulative probability >= p")
    p.add_argument("--num-samples", type=int, default=1,
                   help="number of samples, generated as one batch")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on CUDA, the checkpoint's dtype otherwise)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: static KV cache + torch.compile'd decode step replayed as a CUDA "
                        "graph (the first call compiles); on other devices it warns and runs eagerly")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError with a one-line message naming the bad flag."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.chat and args.num_samples != 1:
        raise ValueError("--num-samples cannot be combined with --chat")
    if args.chat and args.prompt:
        raise ValueError("--prompt cannot be combined with --chat; type (or pipe) the messages instead")
    if args.system is not None and not args.chat:
        raise ValueError("--system only applies to --chat")
    if not os.path.exists(args.model):
        raise ValueError(f"--model {args.model}: no such file or directory (pass a .pt "
                         f"checkpoint, a quantized .bin or an HF model directory)")


def load(path: str, device: str, dtype: torch.dtype | None):
    """model.load_model, plus a check that a tokenizer came with the model."""
    from model import load_model

    try:
        model = load_model(path, device=device, dtype=dtype)
    except (ValueError, OSError):
        raise  # CheckpointError & co. already name the file and the fix
    except Exception as e:  # e.g. the unpickler choking on a file that is not a checkpoint
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"--model {path}: cannot load it as a FishAI model ({type(e).__name__}"
                         f"{': ' + detail if detail else ''}); pass a .pt checkpoint, a quantized "
                         f".bin or an HF model directory") from None
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"--model {path}: the model has no tokenizer; re-save it with "
                         f"train.py/quantize.py, which embed the tokenizer")
    return model


def run_generate(model, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    """Plain generation: print the prompt, then stream (1 sample) or print (N samples)."""
    from tqdm import tqdm

    tok = model.tokenizer
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):  # `echo` adds one; it is not part of the prompt
            prompt = prompt[:-1]
            if prompt.endswith("\r"):
                prompt = prompt[:-1]
    # An empty prompt starts a fresh document: the document separator is the natural start token.
    ids = tok.encode(prompt) if prompt else [tok.eos_id]
    if not ids:
        ids = [tok.eos_id]
    ids, max_new = fit_prompt(ids, args.max_new_tokens, model.config.max_seq_len,
                              warn=lambda m: print(f"warning: {m}", file=err))
    stops = [tok.eos_id] if tok.eos_id is not None else []
    gen = make_generator(args.seed, next(model.parameters()).device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
              stop_ids=stops, num_samples=args.num_samples, generator=gen, compile=args.compile)
    t0 = time.perf_counter()
    n_tokens = 0
    if args.num_samples == 1:
        out.write(prompt)
        out.flush()
        new_ids: list[int] = []
        steps = stream_generate(model, ids, max_new, **kw)
        try:
            for piece in stream_text(tok, steps, stop_ids=stops, ids_out=new_ids):
                out.write(piece)
                out.flush()
        finally:
            steps.close()
        out.write("\n")
        n_tokens = len(new_ids)
    else:
        rows: list[list[int]] = [[] for _ in range(args.num_samples)]
        bar = tqdm(total=max_new, desc="generating", unit="step", file=err, leave=False)
        for step in stream_generate(model, ids, max_new, **kw):
            for i, t in enumerate(step):
                if t is not None and t not in stops:
                    rows[i].append(t)
            bar.update(1)
        bar.close()
        for i, row in enumerate(rows):
            out.write(f"--- sample {i + 1}/{args.num_samples} ---\n{prompt}{tok.decode(row)}\n")
        n_tokens = sum(len(r) for r in rows)
    out.flush()
    dt = time.perf_counter() - t0
    print(f"[{n_tokens} new tokens in {dt:.2f}s, {n_tokens / max(dt, 1e-9):.1f} tok/s]", file=err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.compile and not device.startswith("cuda"):
            # The static cache attends over the whole context every step; on CPU that (and the
            # minute-long compile) costs more than the Python overhead CUDA graphs remove.
            print(f"warning: --compile only speeds up CUDA decoding; running eagerly on {device}",
                  file=sys.stderr)
            args.compile = False
        model = load(args.model, device, dtype)
        if args.chat:
            gen = make_generator(args.seed, device)
            if args.seed is not None:
                torch.manual_seed(args.seed)
            chat_loop(model, sys.stdin, sys.stdout, system=args.system,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k or None, top_p=args.top_p, generator=gen,
                      compile=args.compile, interactive=sys.stdin.isatty())
        else:
            run_generate(model, args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `generate.py ... | head`: the reader went away; not an error worth a traceback
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
