"""
The tokenizer and the chat template: a byte-level BPE wrapper (`TextTokenizer`) whose special
tokens have fixed ids, ChatML rendering, incremental decoding of a token stream, and
`load_tokenizer` (a tokenizer folder, a tokenizer.json, or the one a checkpoint embeds).

This is all of the data side that the model and the decode engine use.

    from text_tokenizer import load_tokenizer, render_chatml
    tok = load_tokenizer("tokenizer/")
    ids = tok.encode(render_chatml([{"role": "user", "content": "Hi"}], add_generation_prompt=True))
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import common
from common import TEXT_KINDS, DataError, atomic_write_text, one_line

# ----------------------------------------------------------------------------------------------
# special tokens: ids 0..3 are fixed so every tokenizer trained here agrees on them

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_ID, IM_START_ID, IM_END_ID, PAD_ID = 0, 1, 2, 3

# ChatML, the same template Qwen/OpenAI-style chat models use. No default system prompt: the
# rendered text is exactly the messages, so SFT data and inference prompts agree byte for byte.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)




# ----------------------------------------------------------------------------------------------
# tokenizer


def _tokenizer_config(chat_template: str = CHATML_TEMPLATE, model_max_length: int = 1 << 20) -> dict:
    """tokenizer_config.json contents that transformers.AutoTokenizer understands offline."""
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "additional_special_tokens": [SPECIAL_TOKENS[IM_START_ID], SPECIAL_TOKENS[IM_END_ID]],
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
    }


def _special_tokens_map() -> dict:
    return {
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "additional_special_tokens": [SPECIAL_TOKENS[IM_START_ID], SPECIAL_TOKENS[IM_END_ID]],
    }


def fast_encode_batch(backend, texts: list[str]):
    """backend.encode_batch without the character offsets nobody here reads (tokenizers >= 0.20:
    encode_batch_fast, ~25% faster on 2 cores); the same ids either way."""
    fn = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return fn(texts, add_special_tokens=False)


class TextTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` plus its tokenizer_config.json.

    encode() treats special-token strings typed in the text as plain text (so a user cannot
    inject `<|im_end|>` into a chat); pass allow_special=True to parse them as control tokens.
    """

    def __init__(self, tokenizer_json: str, tokenizer_config: dict | str | None = None):
        from tokenizers import Tokenizer

        if isinstance(tokenizer_config, str):
            tokenizer_config = json.loads(tokenizer_config)
        self.config: dict = dict(tokenizer_config or _tokenizer_config())
        self._json = tokenizer_json
        # two instances instead of flipping one flag per call: encode_batch runs on many
        # Rust threads and callers may use both modes concurrently
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.encode_special_tokens = True
        self._tok_special = Tokenizer.from_str(tokenizer_json)
        self._tok_special.encode_special_tokens = False
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = vocab.get(SPECIAL_TOKENS[EOS_ID])
        self.im_start_id = vocab.get(SPECIAL_TOKENS[IM_START_ID])
        self.im_end_id = vocab.get(SPECIAL_TOKENS[IM_END_ID])
        self.pad_id = vocab.get(SPECIAL_TOKENS[PAD_ID])
        self.chat_template: str | None = self.config.get("chat_template")
        canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        self.hash: str = hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # -- construction / persistence
    @classmethod
    def from_dir(cls, path) -> "TextTokenizer":
        path = Path(path)
        tj = path / "tokenizer.json" if path.is_dir() else path
        if not tj.is_file():
            raise DataError(f"{path}: {'no tokenizer.json found' if path.exists() else 'tokenizer not found'}; "
                            f"train one with `python tokenizer_train.py --data ... --output-dir {path}`")
        try:
            text = tj.read_text(encoding="utf-8")
            json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{tj}: not a readable tokenizer.json ({e}); re-train the tokenizer") from None
        cfg_path = tj.parent / "tokenizer_config.json"
        cfg = None
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{cfg_path}: invalid JSON ({e}); delete it or re-train the tokenizer") from None
        try:
            return cls(text, cfg)
        except DataError:
            raise
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{tj}: cannot load tokenizer ({e}); re-train the tokenizer") from None

    @classmethod
    def from_dict(cls, d: dict) -> "TextTokenizer":
        if not isinstance(d, dict) or "tokenizer_json" not in d:
            raise DataError("tokenizer dict must have a 'tokenizer_json' entry (from TextTokenizer.to_dict())")
        return cls(d["tokenizer_json"], d.get("tokenizer_config"))

    def to_dict(self) -> dict:
        return {"tokenizer_json": self._json, "tokenizer_config": json.dumps(self.config, ensure_ascii=False)}

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self._json)
        atomic_write_text(out / "tokenizer_config.json", json.dumps(self.config, indent=2, ensure_ascii=False))
        atomic_write_text(out / "special_tokens_map.json", json.dumps(_special_tokens_map(), indent=2))
        return out

    @property
    def backend(self):
        """The underlying tokenizers.Tokenizer (special strings in text are NOT parsed)."""
        return self._tok

    # -- encode / decode
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        tok = self._tok_special if allow_special else self._tok
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        tok = self._tok_special if allow_special else self._tok
        return [e.ids for e in fast_encode_batch(tok, list(texts))]

    def decode(self, ids, skip_special: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"

    # -- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        template = self.chat_template or CHATML_TEMPLATE
        _check_messages(messages)
        if template == CHATML_TEMPLATE:
            return render_chatml(messages, add_generation_prompt)
        import jinja2.sandbox  # lazy: only custom templates need it

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                eos_token=SPECIAL_TOKENS[EOS_ID])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """ChatML ids and the assistant mask (1 on assistant content tokens and their <|im_end|>).

        Each message is encoded in pieces (header, content, footer) so message text can never
        produce control tokens; for ordinary text the ids equal
        encode(apply_chat_template(messages), allow_special=True).
        """
        _check_messages(messages)
        if self.im_start_id is None or self.im_end_id is None:
            raise DataError("tokenizer has no <|im_start|>/<|im_end|> tokens; re-train it with tokenizer_train.py")
        ids: list[int] = []
        mask: list[int] = []
        nl = self.encode("\n")
        for m in messages:
            head = [self.im_start_id] + self.encode(m["role"] + "\n")
            body = self.encode(m["content"]) + [self.im_end_id]
            a = 1 if m["role"] == "assistant" else 0
            ids += head + body + nl
            mask += [0] * len(head) + [a] * len(body) + [0] * len(nl)
        if add_generation_prompt:
            head = [self.im_start_id] + self.encode("assistant\n")
            ids += head
            mask += [0] * len(head)
        return ids, mask


def chat_stop_ids(tokenizer) -> list[int]:
    """<|im_end|> ends an assistant turn; <|endoftext|> also stops a model that never learned it."""
    ids = [getattr(tokenizer, "im_end_id", None), getattr(tokenizer, "eos_id", None)]
    return [i for i in ids if i is not None]


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


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """CHATML_TEMPLATE rendered in plain Python: fast in data loaders, no jinja needed."""
    out = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class ChatDocument(str):
    """A conversation read from a chat jsonl row (`messages`, `conversations` or instruction/
    output), as its ChatML text (what tokenizer_train trains on); .messages keeps the turns, so
    prepare encodes it with TextTokenizer.encode_chat: control tokens only where the template
    puts them, never from the message text."""

    messages: list

    def __new__(cls, messages: list[dict]):
        doc = super().__new__(cls, render_chatml(messages))
        doc.messages = messages
        return doc


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise DataError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be a dict with string 'role' and 'content' (got {str(m)[:80]})")


def load_tokenizer(path) -> TextTokenizer:
    """Load a tokenizer directory (tokenizer.json + tokenizer_config.json), a tokenizer.json file, or
    the tokenizer a FishAI checkpoint (.pt) embeds. Any other model file is refused with what it is."""
    p = Path(path)
    if p.is_file() and p.name != "tokenizer.json":
        kind = common.file_kind(p)
        if kind in ("zip", "checkpoint"):
            return _checkpoint_tokenizer(p)
        if kind not in TEXT_KINDS:
            raise DataError(f"{p} is {common.FILE_KINDS[kind][0]}, not a tokenizer: pass the tokenizer directory "
                            "(tokenizer_train.py's --output-dir, or a prepared dataset's tokenizer/)")
    return TextTokenizer.from_dir(path)


def _checkpoint_tokenizer(path: Path) -> TextTokenizer:
    """The tokenizer embedded in a FishAI .pt checkpoint (train.py saves it there)."""
    import torch  # lazy: only a checkpoint needs it
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or unsafe: one line
        raise DataError(f"{path}: a zip file that is not a readable FishAI checkpoint ({one_line(e)}); "
                        "pass the tokenizer directory") from None
    data = ckpt.get("tokenizer") if isinstance(ckpt, dict) else None
    if not data:
        raise DataError(f"{path}: the checkpoint embeds no tokenizer; pass the tokenizer directory it was "
                        "trained with (tokenizer_train.py's --output-dir)")
    return TextTokenizer.from_dict(data)


