"""The tokenizer Parley uses: `tokenizers` + the model's Jinja chat template.

We avoid importing `transformers` (seconds of start-up) by loading
tokenizer.json with the `tokenizers` library and rendering the chat template
with Jinja2 the way transformers does. Token ids, not text, are what the KV
cache is keyed on, so encode/decode must round-trip exactly.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from app.errors import ParleyError


class ChatTokenizer:
    def __init__(self, folder: Path):
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ParleyError(
                f"Model folder {folder} has no tokenizer.json. Parley needs a fast tokenizer: "
                "convert the model with mlx_lm.convert, which writes one."
            )
        self.folder = folder
        self._tok = Tokenizer.from_file(str(tok_file))
        self.config = _read_json(folder / "tokenizer_config.json")
        self.template_source = _chat_template(folder, self.config)
        self.eos_ids = _eos_ids(folder, self.config, self._tok)
        self.bos_token = _token_text(self.config.get("bos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def decode_reply(self, ids: list[int]) -> str:
        """Text of generated ids, without the end-of-turn marker."""
        return self._tok.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=_token_text(self.config.get("eos_token")) or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    def stream(self) -> "TextStream":
        return TextStream(self)

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
        return env.from_string(self.template_source)


class TextStream:
    """Turns generated token ids into text deltas, never splitting a UTF-8 character.

    Byte-level BPE can emit half of a multi-byte character; decoding then
    yields U+FFFD. We hold text back until the decoded tail is whole.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        if token_id in self._tokenizer.eos_ids:
            return ""
        self._ids.append(token_id)
        text = self._tokenizer.decode_reply(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta

    @property
    def text(self) -> str:
        """The whole reply; a character cut off by the end of generation is dropped, as when streaming."""
        return self._tokenizer.decode_reply(self._ids).rstrip("\ufffd")

    def rest(self) -> str:
        """At the end of the reply: what `text` holds beyond the deltas `push` returned, as one last delta.

        `push` holds back text whose decoding ends in U+FFFD (a character that may be cut), and a token can
        hold text before its cut byte ("l" then half a character): when the reply ends there, that text
        is in `text` but was never streamed. Streaming this rest makes the deltas add up to `text`.
        """
        text = self.text
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta


_DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chat_template(folder: Path, config: dict) -> str:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return template or _DEFAULT_TEMPLATE


def _eos_ids(folder: Path, config: dict, tok: Tokenizer) -> set[int]:
    ids: set[int] = set()
    model_eos = _read_json(folder / "config.json").get("eos_token_id")
    if isinstance(model_eos, int):
        ids.add(model_eos)
    elif isinstance(model_eos, list):
        ids.update(model_eos)
    for text in (_token_text(config.get("eos_token")), "<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if text and (idx := tok.token_to_id(text)) is not None:
            ids.add(idx)
    return ids


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ParleyError(f"{path} is not valid JSON ({exc}). Re-create the model folder.") from exc


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)
