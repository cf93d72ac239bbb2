"""The tokenizer stored in a GGUF file's metadata (byte-level BPE, as llama.cpp writes it) as a
`tokenizers.Tokenizer` inside a TextTokenizer. Reached through TextTokenizer.load(".gguf")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from models.tokenizer import TextTokenizer, set_bos_eos

# ---- GGUF file -----------------------------------------------------------------------------

# llama.cpp's `tokenizer.ggml.pre` names -> the split regex their merges were learned with.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in a vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _gguf_metadata(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if not (name.startswith("tokenizer.") or name == "general.architecture"):
            continue
        if hasattr(field, "contents"):
            meta[name] = field.contents()
            continue
        # Older gguf-py: decode from the raw parts.
        values = [field.parts[i] for i in field.data]
        kind = field.types[-1]
        if kind == gguf.GGUFValueType.STRING:
            decoded: list[Any] = [bytes(v).decode("utf-8") for v in values]
        else:
            decoded = [v.tolist()[0] for v in values]
        is_array = field.types[0] == gguf.GGUFValueType.ARRAY
        meta[name] = decoded if is_array else decoded[0]
    return meta


def _gguf_byte_level(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`), shaped like transformers' conversion."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = _GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    hf.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    # Control tokens stay whole and are special; one spelled outside the byte alphabet is a
    # llama.cpp mislabel and is left alone. User-defined tokens stay whole but are not special.
    control = [
        t for t, k in zip(tokens, types, strict=False) if k == _CONTROL and set(t) <= alphabet
    ]
    if control:
        hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    known = hf.get_vocab()
    user = [t for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED and t in known]
    if user:
        hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return hf


def load_gguf_tokenizer(path: Path) -> TextTokenizer:
    meta = _gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path.name}: GGUF tokenizer model {kind!r} is not supported (only byte-level 'gpt2')"
        )
    hf = _gguf_byte_level(meta)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    set_bos_eos(
        hf,
        special["bos_token"],
        special["eos_token"],
        bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    # llama.cpp also ends generation on the end-of-turn / end-of-message tokens.
    extra = [
        meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta
    ]
    return TextTokenizer(
        hf,
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens=special,
        extra_eos_ids=[i for i in extra if isinstance(i, int)],
    )
