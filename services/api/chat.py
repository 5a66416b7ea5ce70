"""Chat messages → prompt text with the checkpoint's `chat_template`, rendered as Hugging Face renders it.

The template comes from `tokenizer_config.json` (`chat_template`: a string, or a list of named
templates of which `default` is used). Like transformers' `apply_chat_template`: Jinja2's immutable
sandbox with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter,
`raise_exception` and `strftime_now`, and the variables `messages`, `add_generation_prompt`,
`bos_token` and `eos_token`. Pure: no NATS.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The messages cannot be rendered (the template refused them, or there is no template)."""


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token(value: Any) -> str:
    """A special token of tokenizer_config.json: a string or `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"the chat template does not parse: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_dir(cls, directory: Path) -> ChatTemplate | None:
        """The template of `directory/tokenizer_config.json`, or None when it has none."""
        path = directory / "tokenizer_config.json"
        if not path.is_file():
            return None
        config = json.loads(path.read_text())
        source = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            return None
        return cls(source, _token(config.get("bos_token")), _token(config.get("eos_token")))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content"}]); TemplateError when the template refuses."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed on these messages: {exc}") from None
