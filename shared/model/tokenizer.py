"""Tokenizer from a checkpoint's `tokenizer.json` (the `tokenizers` library), with streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from shared.model.errors import CheckpointError

# Common end-of-sequence spellings, tried in order when no config names the eos token.
_EOS_CANDIDATES = ("<|eos|>", "<|endoftext|>", "</s>", "<|im_end|>", "<eos>")


class Tokenizer:
    """encode / decode token ids; `eos_token_id` from tokenizer_config.json or config.json."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token_id: int | None = None) -> None:
        self._tok = tokenizer
        self.eos_token_id = eos_token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `path/tokenizer.json`; raises CheckpointError if it is missing or unreadable."""
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"no tokenizer.json in {directory}")
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises a bare Exception subclass
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
        return cls(tok, _find_eos(directory, tok))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def stream(self) -> StreamDecoder:
        """A decoder that turns ids into text pieces as they arrive."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decoding: `push(id)` returns the new text that id completes ("" while a
    multi-byte character is still incomplete). The pieces concatenate to `decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of decode(self._ids) already returned

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece

    def flush(self) -> str:
        """Whatever is left (a trailing incomplete character decodes as U+FFFD)."""
        text = self._tokenizer.decode(self._ids)
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece


def _find_eos(directory: Path, tok: _HFTokenizer) -> int | None:
    """The eos id: config.json's eos_token_id, else tokenizer_config.json's eos_token, else a
    well-known spelling present in the vocabulary."""
    config = _read_json(directory / "config.json")
    eos = config.get("eos_token_id")
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if isinstance(eos, int):
        return eos
    tok_config = _read_json(directory / "tokenizer_config.json")
    name = tok_config.get("eos_token")
    if isinstance(name, dict):
        name = name.get("content")
    for candidate in ([name] if isinstance(name, str) else []) + list(_EOS_CANDIDATES):
        token_id = tok.token_to_id(candidate)
        if token_id is not None:
            return int(token_id)
    return None


def _read_json(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
