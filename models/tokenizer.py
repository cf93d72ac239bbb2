"""Text tokenizer: loads a checkpoint's tokenizer (HF folder or GGUF file) and its chat template.
The tokenizer stage uses it to render and encode prompts; the detokenizer stage uses it to decode."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import (
    Encoding,
    Tokenizer,
    processors,
)

from models.chat_template import render_chat_template

# Texts this long are encoded through encode_batch, which releases the GIL while the Rust code
# runs (encode holds it): a stage that tokenizes a long prompt on a worker thread keeps serving.
GIL_FREE_CHARS = 4096


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template that go with it."""

    def __init__(
        self,
        hf: Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        extra_eos_ids: list[int] | None = None,
    ) -> None:
        self.hf = hf
        self.chat_template = chat_template
        # bos_token / eos_token / unk_token / pad_token strings, as templates see them.
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = hf.token_to_id(bos) if bos is not None else None
        eos_ids: list[int] = []
        eos = self.special_tokens.get("eos_token")
        eos_id = hf.token_to_id(eos) if eos is not None else None
        for i in ([eos_id] if eos_id is not None else []) + list(extra_eos_ids or []):
            if i not in eos_ids:
                eos_ids.append(i)
        self.eos_token_ids: list[int] = eos_ids
        added = hf.get_added_tokens_decoder()
        self.all_special_ids: set[int] = {i for i, tok in added.items() if tok.special}
        # Special tokens as text, longest first (so a regex finds the longest at a position, as
        # the tokenizer does), with whether each swallows the whitespace left / right of it.
        specials = sorted({t.content for t in added.values() if t.special}, key=len, reverse=True)
        self._special_strip = {t.content: (t.lstrip, t.rstrip) for t in added.values() if t.special}
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    @classmethod
    def load(cls, path: str) -> TextTokenizer:
        """From an HF checkpoint folder, or from a `.gguf` file."""
        p = Path(path)
        if p.is_file():
            if p.suffix != ".gguf":
                raise ValueError(f"{path} is a file but not a .gguf; pass a checkpoint folder")
            from models.gguf_tokenizer import load_gguf_tokenizer  # it builds a TextTokenizer

            return load_gguf_tokenizer(p)
        if not p.is_dir():
            raise FileNotFoundError(f"no tokenizer at {path}")
        return _load_folder(p)

    # ---- encode / decode -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._encoding(text, add_special_tokens).ids

    def _encoding(self, text: str, add_special_tokens: bool) -> Encoding:
        if len(text) >= GIL_FREE_CHARS:
            return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    # ---- chat ------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render `messages` (checked by actors.admission.parse_messages) as prompt text; with
        `continue_final_message` the text ends inside the final message, for the model to go on."""
        return self._render(messages, add_generation_prompt, continue_final_message, kwargs, None)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        add_special_tokens: bool = False,
        chat_template: str | None = None,
    ) -> list[int]:
        """Render and tokenize a chat. The template's own special tokens become control tokens;
        special tokens typed in anything the request supplies (message text, names, tool
        definitions, template arguments) are encoded as the plain text they are, so a user cannot
        forge a turn. A chat with no such text is tokenized exactly as transformers does it
        (render, then encode the whole text). `chat_template` replaces the server's template."""
        hidden = _HiddenSpecials(self._special_re)
        text = self._render(
            hidden.hide(messages),
            add_generation_prompt,
            continue_final_message,
            hidden.hide(dict(template_kwargs or {})),
            chat_template,
        )
        if not hidden.originals:
            return self.encode(text, add_special_tokens=add_special_tokens)
        return self._encode_template_specials_only(text, hidden, add_special_tokens)

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool,
        kwargs: Mapping[str, Any],
        chat_template: str | None,
    ) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(
                "this checkpoint has no chat template; send a plain prompt (completions) instead"
            )
        context = {**self.special_tokens, **kwargs}
        return render_chat_template(
            template, messages, add_generation_prompt, continue_final_message, **context
        )

    def _encode_template_specials_only(
        self, text: str, hidden: _HiddenSpecials, add_special_tokens: bool
    ) -> list[int]:
        """Token ids of rendered `text` in which every special token is the template's own and
        request text holds placeholders: the text between special tokens (placeholders back to
        what the request wrote) is encoded with special-token matching off, as the tokenizer
        itself splits around special tokens, honouring their lstrip / rstrip."""
        assert self._special_re is not None
        pieces: list[tuple[str, bool]] = []  # (text, is a template special token)
        at = 0
        for match in self._special_re.finditer(text):
            lstrip, rstrip = self._special_strip[match.group()]
            before = text[at : match.start()]
            pieces.append((before.rstrip() if lstrip else before, False))
            pieces.append((match.group(), True))
            at = match.end()
            if rstrip:
                at += len(text[at:]) - len(text[at:].lstrip())
        pieces.append((text[at:], False))
        kept = self.hf.encode_special_tokens
        encodings: list[Encoding] = []
        try:
            for piece, special in pieces:
                piece = piece if special else hidden.restore(piece)
                if piece:
                    self.hf.encode_special_tokens = not special
                    encodings.append(self._encoding(piece, add_special_tokens=False))
        finally:
            self.hf.encode_special_tokens = kept
        merged = Encoding.merge(encodings, growing_offsets=True)
        if add_special_tokens:
            merged = self.hf.post_process(merged, None, True)
        return list(merged.ids)


class _HiddenSpecials:
    """Swaps the special tokens written in request data for random placeholders (before the
    template renders it) and back (after the template's own special tokens are found)."""

    def __init__(self, special_re: re.Pattern[str] | None) -> None:
        self.special_re = special_re
        self.nonce = "TSPECIAL" + secrets.token_hex(8)
        self.originals: dict[str, str] = {}  # placeholder -> the special token's text
        self.placeholders: dict[str, str] = {}  # the special token's text -> placeholder

    def _swap(self, match: re.Match[str]) -> str:
        token = match.group()
        placeholder = self.placeholders.get(token)
        if placeholder is None:
            placeholder = f"{self.nonce}x{len(self.placeholders)}x"
            self.placeholders[token] = placeholder
            self.originals[placeholder] = token
        return placeholder

    def hide(self, value: Any) -> Any:
        """A copy of JSON-like `value` whose strings (keys too) hold placeholders."""
        if self.special_re is None:
            return value
        if isinstance(value, str):
            return self.special_re.sub(self._swap, value)
        if isinstance(value, dict):
            return {self.hide(k): self.hide(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.hide(v) for v in value]
        return value

    def restore(self, text: str) -> str:
        if not self.originals or self.nonce not in text:
            return text
        pattern = re.compile(f"{self.nonce}x[0-9]+x")
        return pattern.sub(lambda m: self.originals.get(m.group(), m.group()), text)


# ---- HF checkpoint folder ------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _pick_template(value: Any) -> str | None:
    # A config may hold several named templates; "default" is the one chat uses.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None


def _folder_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    from_json = _pick_template(_read_json(folder / "chat_template.json").get("chat_template"))
    return from_json or _pick_template(config.get("chat_template"))


def set_bos_eos(
    hf: Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> None:
    """Install the post-processor that adds BOS/EOS as the config asks (as transformers does)."""
    # The tokens to add: asked for and in the vocabulary, else None.
    bos = bos if add_bos and bos is not None and hf.token_to_id(bos) is not None else None
    eos = eos if add_eos and eos is not None and hf.token_to_id(eos) is not None else None
    single = (
        f"{bos + ':0 ' if bos is not None else ''}$A:0{' ' + eos + ':0' if eos is not None else ''}"
    )
    pair = (
        f"{single}{' ' + bos + ':1' if bos is not None else ''}"
        f" $B:1{' ' + eos + ':1' if eos is not None else ''}"
    )
    special = [(t, hf.token_to_id(t)) for t in (bos, eos) if t is not None]
    hf.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


def _load_folder(folder: Path) -> TextTokenizer:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    hf = Tokenizer.from_file(str(tokenizer_file))
    config = _read_json(folder / "tokenizer_config.json")
    special = {
        name: _token_text(config.get(name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    if "add_bos_token" in config or "add_eos_token" in config or hf.post_processor is None:
        set_bos_eos(
            hf,
            special["bos_token"],
            special["eos_token"],
            bool(config.get("add_bos_token", False)),
            bool(config.get("add_eos_token", False)),
        )
    extra_eos = _eos_ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
    extra_eos += _eos_ids(_read_json(folder / "config.json").get("eos_token_id"))
    return TextTokenizer(
        hf,
        chat_template=_folder_chat_template(folder, config),
        special_tokens=special,
        extra_eos_ids=extra_eos,
    )
