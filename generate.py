"""
Sample text from, or chat with, a FishAI model.

Any model that model.load_model accepts works: a training checkpoint (.pt), a quantized
export (.bin) or a FishAI/HF Llama directory. The tokenizer always comes from the model,
so a single file is enough.

Usage (copy-paste):

    # continue a prompt, streaming tokens to the terminal as they are produced
    python generate.py --model checkpoints/fishai-best.pt --prompt "Once upon a time"

    # greedy decoding (temperature 0), 100 new tokens
    python generate.py --model checkpoints/fishai-best.pt --prompt "The capital of France" \\
        --temperature 0 --max-new-tokens 100

    # three samples in one batch, reproducible
    python generate.py --model fishai-int4.bin --prompt "def fib(n):" --num-samples 3 --seed 42

    # prompt from stdin
    echo "In 1905, Einstein" | python generate.py --model checkpoints/fishai-best.pt --prompt -

    # interactive multi-turn chat (SFT model), /help lists the commands
    python generate.py --model checkpoints/fishai-sft.pt --chat --system "You are a helpful assistant."

    # scripted chat: one user message per line in, the conversation in ChatML out
    printf 'Hello!\\nWhat is 2+2?\\n' | python generate.py --model checkpoints/fishai-sft.pt --chat

    # CUDA decodes through a compiled step replayed as a CUDA graph by default (the first call
    # compiles for ~20-60 s); --no-compile decodes eagerly (no wait, slower per token)
    python generate.py --model checkpoints/fishai-best.pt --prompt "Hello" --device cuda --no-compile

Plain generation prints the prompt followed by the continuation; generation stops at the
tokenizer's end-of-text token or after --max-new-tokens. Timing figures go to stderr (none with
--quiet) so stdout stays clean for scripts.

Chat replies stop at <|im_end|>. In a terminal the input line has readline editing and history
(arrow keys), and replies are prefixed with 'fish> '. When stdin is not a terminal (piped use),
stdout carries the conversation in ChatML, the template the model was fine-tuned on, so a script
can tell the turns apart: each message read as "<|im_start|>user\\n{message}<|im_end|>\\n", then its
reply as "<|im_start|>assistant\\n{reply}<|im_end|>\\n" (the reply's text exactly as generated,
newlines included). A message that does not fit the context gets no assistant turn; the reason
goes to stderr, like every other notice. A model that was never fine-tuned for chat (its
checkpoint does not record train.py --stage sft) gets a warning on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO

import torch
from tqdm import tqdm

import common
from engine import TokenStream, fast_decode_default, fit_prompt, generate_samples, stream_generate
from model import chat_training_warning, load_model
import text_tokenizer
from text_tokenizer import IncrementalDecoder, chat_stop_ids

DEFAULT_MODEL = "checkpoints/fishai-best.pt"
CHAT_HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), "
    "/history (show the conversation), /help, /quit (or /exit, Ctrl-D)"
)
# Role markers of piped chat: a turn's header and end, exactly as text_tokenizer.render_chatml writes them.
ASSISTANT_HEADER = text_tokenizer.render_chatml([], add_generation_prompt=True)
TURN_END = "<|im_end|>\n"


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(
        description="Sample text from, or chat with, a FishAI model (.pt checkpoint, quantized .bin\n"
                    "or HF directory). Tokens are streamed to stdout as they are produced.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model to load: training checkpoint (.pt), quantized export (.bin) or "
                        "FishAI/HF Llama directory")
    p.add_argument("--prompt", default="",
                   help="text to continue; '-' reads it from stdin; default empty: a fresh document")
    p.add_argument("--chat", action="store_true",
                   help="multi-turn chat with the tokenizer's chat template: interactive in a terminal; "
                        "with piped stdin one message per line, the conversation written out in ChatML")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--max-new-tokens", type=common.int_flag(1), default=200,
                   help="maximum number of tokens to generate (per chat reply with --chat)")
    p.add_argument("--temperature", type=common.float_flag(0), default=0.8,
                   help="sampling temperature; 0 = greedy decoding")
    p.add_argument("--top-k", type=common.int_flag(0), default=200,
                   help="sample only from the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=common.float_flag(0, 1, lo_open=True), default=None,
                   help="nucleus sampling: smallest token set with cumulative probability >= p (0 < p <= 1)")
    p.add_argument("--num-samples", type=common.int_flag(1), default=1,
                   help="number of samples, generated as one batch")
    p.add_argument("--seed", type=common.int_flag(0), default=None, help="random seed for reproducible samples")
    common.add_device_flag(p)
    common.add_dtype_flag(p, "compute dtype (default auto: bf16 on CUDA, fp16 where bf16 is unsupported, "
                         "fp32 elsewhere)")
    common.add_dequantize_flag(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="static KV cache + torch.compile'd decode step replayed as a CUDA graph (the first "
                        "call compiles). Default: on for CUDA, off elsewhere (on a CPU it warns and runs "
                        "eagerly: compiling costs more than it saves there)")
    common.add_quiet_flag(p)
    return p


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator | None:
    """A torch.Generator on the model's device, or None when no seed is given."""
    if seed is None:
        return None
    dev = torch.device(device)
    gen = torch.Generator(device=dev.type if dev.type != "cpu" else "cpu")
    gen.manual_seed(seed)
    return gen


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


def fit_generation_prompt(prompt_ids: list[int], max_new_tokens: int, max_seq_len: int,
               warn: Callable[[str], None] | None = None) -> tuple[list[int], int]:
    """model.fit_prompt, keeping at least half the window for the prompt so that a long reply
    never pushes the whole prompt out; `warn` is told what was cut."""
    ids, max_new = fit_prompt(prompt_ids, max_new_tokens, max_seq_len, min_prompt=max_seq_len // 2)
    if warn and len(ids) < len(prompt_ids):
        warn(f"prompt has {len(prompt_ids)} tokens; keeping the last {len(ids)} to fit the "
             f"{max_seq_len}-token context")
    if warn and max_new < max_new_tokens:
        warn(f"--max-new-tokens {max_new_tokens} does not fit the {max_seq_len}-token context "
             f"after a {len(ids)}-token prompt; generating at most {max_new}")
    return ids, max_new


# ----------------------------------------------------------------------------------------------
# chat


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


def enable_line_editing() -> bool:
    """Importing readline is what gives input() line editing (arrow keys, Ctrl-A/E, ...) and the
    session's history (up/down) in a terminal. Lazy and optional: it is missing on Windows and in
    some minimal Pythons, and chat works without it. Returns whether it is on."""
    try:
        import readline  # noqa: F401
    except ImportError:
        return False
    return True


class ChatSession:
    """One conversation of chat_loop: the history, the reply settings and the streams.
    read_line() gets the next user line, command() runs a /command, turn() sends one message."""

    def __init__(self, model, inp: TextIO, out: TextIO, err: TextIO, *, system: str | None,
                 max_new_tokens: int, interactive: bool, role_markers: bool, gen_kw: dict):
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer attached; load it with model.load_model")
        self.model, self.tok = model, model.tokenizer
        self.inp, self.out, self.err = inp, out, err
        self.system, self.max_new_tokens, self.gen_kw = system, max_new_tokens, gen_kw
        self.interactive, self.role_markers = interactive, role_markers
        self.stops = chat_stop_ids(self.tok)
        self.max_seq_len = model.config.max_seq_len
        # Room kept for the reply when deciding how much history fits; at most half the context so
        # a long --max-new-tokens does not wipe out the whole conversation.
        self.reserve = max(1, min(max_new_tokens, self.max_seq_len // 2))
        self.messages = self.fresh()
        self.use_input = interactive and inp is sys.stdin  # input(): readline editing in a terminal
        if self.use_input:
            enable_line_editing()

    def fresh(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def notice(self, msg: str) -> None:
        print(f"[{msg}]", file=self.err, flush=True)

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def read_line(self) -> str | None:
        """The next line without its line break; None at the end of the input."""
        if self.use_input:
            try:
                return input("you> ").rstrip("\r\n")
            except EOFError:
                return None
        if self.interactive:
            self.write("you> ")
        line = self.inp.readline()
        return None if line == "" else line.rstrip("\r\n")

    def command(self, text: str) -> bool:
        """Run one /command (CHAT_HELP); False means quit."""
        cmd, _, rest = text.partition(" ")
        cmd = cmd.lower()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/reset":
            self.messages = self.fresh()
            self.notice("conversation reset")
        elif cmd == "/system":
            self.system = rest.strip() or None
            self.messages = self.fresh()
            self.notice("system prompt " + ("set" if self.system else "cleared") + "; conversation reset")
        elif cmd == "/history":
            for m in self.messages:
                print(f"{m['role']}: {m['content']}", file=self.err)
            self.err.flush()
        elif cmd == "/help":
            self.notice(CHAT_HELP)
        else:
            self.notice(f"unknown command {cmd}; " + CHAT_HELP)
        return True

    def turn(self, text: str) -> None:
        """Send one user message (dropping the oldest turns when the context is full), stream the
        reply and add both to the history."""
        if self.role_markers:
            self.write(text_tokenizer.render_chatml([{"role": "user", "content": text}]))
        self.messages.append({"role": "user", "content": text})
        ids, dropped = trim_history(self.tok, self.messages, self.reserve, self.max_seq_len)
        if dropped:
            self.notice(f"history trimmed: dropped the {dropped} oldest turn(s) to fit the "
                        f"{self.max_seq_len}-token context")
        if len(ids) >= self.max_seq_len:
            self.messages.pop()
            self.notice(f"message too long: {len(ids)} tokens with the chat template, the context is "
                        f"{self.max_seq_len}; not sent")
            return
        self.write(ASSISTANT_HEADER if self.role_markers else "fish> " if self.interactive else "")
        reply_ids = self.stream_reply(ids, min(self.max_new_tokens, self.max_seq_len - len(ids)))
        self.write(TURN_END if self.role_markers else "\n")
        self.messages.append({"role": "assistant", "content": self.tok.decode(reply_ids, skip_special=True)})

    def stream_reply(self, ids: list[int], budget: int) -> list[int]:
        """Stream one reply to the output; returns its token ids (without the stop token). Ctrl-C in
        a terminal ends the reply, not the chat."""
        reply_ids: list[int] = []
        steps = stream_generate(self.model, ids, budget, stop_ids=self.stops, **self.gen_kw)
        try:
            for piece in stream_text(self.tok, steps, stop_ids=self.stops, ids_out=reply_ids):
                self.write(piece)
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            self.notice("reply interrupted")
        finally:
            steps.close()
        return reply_ids


def chat_loop(model, input_stream: TextIO, output_stream: TextIO, *, system: str | None = None,
              max_new_tokens: int = 256, temperature: float = 0.7, top_k: int | None = 50,
              top_p: float | None = 0.9, generator: torch.Generator | None = None,
              compile: bool = False, interactive: bool = False, role_markers: bool = False,
              err_stream: TextIO | None = None, token_stream: TokenStream | None = None) -> list[dict]:
    """Multi-turn chat. Reads one user message per line from input_stream, streams each reply to
    output_stream and keeps the history, trimming the oldest turns when the context would
    overflow (a notice goes to err_stream). Lines starting with '/' are commands (CHAT_HELP).
    In interactive mode the user is prompted with 'you> ' and replies are prefixed with 'fish> ';
    otherwise each reply is one line, or, with role_markers, the conversation is written in
    ChatML (see the module docstring). Returns the final message history."""
    chat = ChatSession(model, input_stream, output_stream, err_stream if err_stream is not None else sys.stderr,
                       system=system, max_new_tokens=max_new_tokens, interactive=interactive,
                       role_markers=role_markers,
                       gen_kw=dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                   compile=compile, token_stream=token_stream))
    if interactive:
        name = os.path.basename(str(getattr(model, "source", "") or "FishAI"))
        chat.notice(f"chatting with {name} ({chat.max_seq_len}-token context); " + CHAT_HELP)
    while True:
        text = chat.read_line()
        if text is None:
            if interactive:
                chat.write("\n")
            break
        if not text.strip():
            continue
        if text.startswith("/"):
            if not chat.command(text):
                break
            continue
        chat.turn(text)
    return chat.messages


# ----------------------------------------------------------------------------------------------
# command line


def check_args(args: argparse.Namespace) -> None:
    """The checks across flags (each flag's own range is checked by the parser) and of --model."""
    if args.chat and args.num_samples != 1:
        raise common.FishAIError("--num-samples cannot be combined with --chat")
    if args.chat and args.prompt:
        raise common.FishAIError("--prompt cannot be combined with --chat; type (or pipe) the messages instead")
    if args.system is not None and not args.chat:
        raise common.FishAIError("--system only applies to --chat")
    if not os.path.exists(args.model):
        raise common.FishAIError(f"--model {args.model}: no such file or directory (pass a .pt "
                             f"checkpoint, a quantized .bin or an HF model directory)")


def load(path: str, device, dtype: torch.dtype | None, dequantize: bool = False):
    """model.load_model, plus a check that a tokenizer came with the model."""
    try:
        model = load_model(path, device=device, dtype=dtype, dequantize=dequantize)
    except common.FishAIError:
        raise  # CheckpointError & co. already name the file and the fix
    except Exception as e:  # e.g. the unpickler or transformers choking on a file that is not a model
        detail = common.one_line(e) if str(e).strip() else ""
        raise common.FishAIError(f"--model {path}: cannot load it as a FishAI model ({type(e).__name__}"
                             f"{': ' + detail if detail else ''}); pass a .pt checkpoint, a quantized "
                             f".bin or an HF model directory") from None
    if getattr(model, "tokenizer", None) is None:
        raise common.FishAIError(f"--model {path}: the model has no tokenizer; re-save it with "
                             f"train.py/quantize.py, which embed the tokenizer")
    return model


def read_prompt(prompt: str) -> str:
    """--prompt as given, or stdin for '-' (without the line break `echo` adds)."""
    if prompt != "-":
        return prompt
    prompt = sys.stdin.read()
    if prompt.endswith("\n"):
        prompt = prompt[:-1]
        if prompt.endswith("\r"):
            prompt = prompt[:-1]
    return prompt


def stream_one(model, ids: list[int], max_new: int, kw: dict, prompt: str, out: TextIO) -> int:
    """Print the prompt, then stream its continuation; returns the number of new tokens."""
    out.write(prompt)
    out.flush()
    new_ids: list[int] = []
    steps = stream_generate(model, ids, max_new, **kw)
    try:
        for piece in stream_text(model.tokenizer, steps, stop_ids=kw["stop_ids"], ids_out=new_ids):
            out.write(piece)
            out.flush()
    finally:
        steps.close()
    out.write("\n")
    return len(new_ids)


def print_samples(model, ids: list[int], max_new: int, kw: dict, prompt: str, out: TextIO, err: TextIO,
                  progress: bool) -> int:
    """Generate kw["num_samples"] samples as one batch (a progress bar on err), then print each
    after the prompt; returns the number of new tokens."""
    with tqdm(total=max_new, desc="generating", unit="step", file=err, leave=False, disable=not progress) as bar:
        rows = generate_samples(model, ids, max_new, on_step=lambda: bar.update(1), **kw)
    for i, row in enumerate(rows):
        out.write(f"--- sample {i + 1}/{len(rows)} ---\n{prompt}{model.tokenizer.decode(row)}\n")
    return sum(len(r) for r in rows)


def run_generate(model, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    """Plain generation: print the prompt, then stream (1 sample) or print (N samples)."""
    tok = model.tokenizer
    prompt = read_prompt(args.prompt)
    # An empty prompt starts a fresh document: the document separator is the natural start token.
    ids = (tok.encode(prompt) if prompt else []) or [tok.eos_id]
    ids, max_new = fit_generation_prompt(ids, args.max_new_tokens, model.config.max_seq_len,
                              warn=lambda m: print(f"warning: {m}", file=err))
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
              stop_ids=[tok.eos_id] if tok.eos_id is not None else [], num_samples=args.num_samples,
              generator=make_generator(args.seed, next(model.parameters()).device), compile=args.compile)
    t0 = time.perf_counter()
    if args.num_samples == 1:
        n_tokens = stream_one(model, ids, max_new, kw, prompt, out)
    else:
        n_tokens = print_samples(model, ids, max_new, kw, prompt, out, err, progress=not args.quiet)
    out.flush()
    dt = time.perf_counter() - t0
    if not args.quiet:
        print(f"[{n_tokens} new tokens in {dt:.2f}s, {n_tokens / max(dt, 1e-9):.1f} tok/s]", file=err)


def run_chat(model, args: argparse.Namespace) -> None:
    """--chat on stdin/stdout: interactive in a terminal, ChatML role markers when piped."""
    warning = chat_training_warning(model)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    chat_loop(model, sys.stdin, sys.stdout, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
              generator=make_generator(args.seed, next(model.parameters()).device), compile=args.compile,
              interactive=interactive, role_markers=not interactive)


def generate_command(args: argparse.Namespace) -> int:
    check_args(args)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    if args.compile is None:
        args.compile = fast_decode_default(device)
    elif args.compile and device.type != "cuda":
        # On a CPU the compiled step takes ~10 s to build and, for a .bin, runs at half the speed of
        # the C decode trunk the eager engine uses (docs/RESULTS.md): not worth a wait.
        print(f"warning: --compile only speeds up CUDA decoding; running eagerly on {device}", file=sys.stderr)
        args.compile = False
    model = load(args.model, device, dtype, args.dequantize)
    if args.chat:
        run_chat(model, args)
    else:
        run_generate(model, args, sys.stdout, sys.stderr)
    return common.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_cli(generate_command, args)


if __name__ == "__main__":
    sys.exit(main())
