"""Errors raised by `shared.model` (checkpoint loading, configuration, generation inputs).

Every error says what was wrong and what is accepted. `ModelError` subclasses `ValueError`, so
callers that treat bad input generically still catch it. (`shared.errors` may wrap these.)
"""

from __future__ import annotations


class ModelError(ValueError):
    """Base class of every error raised by `shared.model`."""


class CheckpointError(ModelError):
    """A checkpoint directory is missing, incomplete, or its tensors do not match its config."""


class UnsupportedModelError(ModelError):
    """The checkpoint's architecture or one of its options (RoPE type, activation) is not supported."""


class ConfigError(ModelError):
    """A config value is missing or out of range."""


class InputError(ModelError):
    """A request to the model is malformed: bad token ids, unknown cache slot, cache overflow."""
