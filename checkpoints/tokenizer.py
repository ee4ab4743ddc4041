"""Tokenizers: HF `tokenizer.json` (via the `tokenizers` library) and a byte-level one for demo models.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`, and
`chat_template` (a jinja2 template string, or None) with `bos_token` / `eos_token` (the special tokens as
text, for the template). An HF tokenizer takes its template from `chat_template` in
tokenizer_config.json (a string, or a list of named templates: the one named "default"), or from a
`chat_template.jinja` file beside it (newer HF exports); none found: None.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

from crosspool_jax.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The demo models' chat template: CrossPool's own minimal one (role tags, one message per block, then
# the assistant tag), not the format of any trained model; the demo models have random weights, so
# no template is "theirs". It lets the OpenAI chat endpoint run end to end on them.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from `tokenizer.json`. `encode` adds no special tokens."""

    def __init__(self, path: str | os.PathLike[str]):
        from tokenizers import Tokenizer as _Tok

        self.path = os.fspath(path)
        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON / unknown models
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{self.path}: cannot read tokenizer ({msg})") from None
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = None
        self.bos_token: str | None = None
        self.eos_token: str | None = None
        self.bos_id, self.eos_id = self._special_ids()
        tpl_path = os.path.join(os.path.dirname(self.path), CHAT_TEMPLATE_FILE)
        if self.chat_template is None and os.path.isfile(tpl_path):
            with open(tpl_path) as f:
                self.chat_template = f.read()

    def _special_ids(self) -> tuple[int | None, int | None]:
        """bos/eos ids from tokenizer_config.json next to tokenizer.json, when it names them (and the
        chat template, bos/eos text, into `chat_template` / `bos_token` / `eos_token`)."""
        cfg_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        bos = eos = None
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    tc = json.load(f)
            except (OSError, json.JSONDecodeError):
                tc = {}

            def tok_id(v: object) -> int | None:
                if isinstance(v, dict):
                    v = v.get("content")
                return self._tok.token_to_id(v) if isinstance(v, str) else None

            def tok_text(v: object) -> str | None:
                if isinstance(v, dict):
                    v = v.get("content")
                return v if isinstance(v, str) else None

            bos, eos = tok_id(tc.get("bos_token")), tok_id(tc.get("eos_token"))
            self.bos_token, self.eos_token = tok_text(tc.get("bos_token")), tok_text(tc.get("eos_token"))
            tpl = tc.get("chat_template")
            if isinstance(tpl, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
                named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
                tpl = named.get("default")
            if isinstance(tpl, str) and tpl.strip():
                self.chat_template = tpl
        return bos, eos

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class ByteTokenizer:
    """Byte-level tokenizer for demo models: ids 0..255 are UTF-8 bytes, 256 = bos, 257 = eos (vocab 258)."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    bos_token: str | None = None  # ids 256/257 have no text
    eos_token: str | None = None
    chat_template: str | None = DEMO_CHAT_TEMPLATE  # see DEMO_CHAT_TEMPLATE (the demo models use this class)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ids (no bos/eos added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; specials are dropped and invalid UTF-8 is replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def load_tokenizer(model_dir: str | os.PathLike[str]) -> HFTokenizer | None:
    """The directory's `tokenizer.json` as an HFTokenizer, or None when there is none."""
    path = os.path.join(model_dir, TOKENIZER_FILE)
    return HFTokenizer(path) if os.path.isfile(path) else None
