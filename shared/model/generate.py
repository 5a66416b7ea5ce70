"""In-process reference generation: prefill every prompt, then decode one token per step.

This is what `prism run` uses and what a distributed run must match token for token (greedy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from shared.model.errors import InputError
from shared.model.inference import inference
from shared.model.model import Batch, MoEModel
from shared.model.moe import MoECall
from shared.model.sampling import Sampler, SamplingParams


def generate(  # noqa: PLR0917 - the seam others call positionally
    model: MoEModel,
    experts: Callable[[MoECall], Tensor],
    prompts: list[list[int]],
    max_tokens: int,
    params: list[SamplingParams] | SamplingParams,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate up to `max_tokens` ids per prompt; returns the generated ids (prompt excluded).

    A sequence stops after emitting an end-of-sequence id (included in its output).
    eos_token_id: None = the model config's eos ids; an empty sequence = never stop early.
    params: one SamplingParams for all prompts, or one per prompt (seeded per prompt).
    on_token: called as on_token(prompt_index, token_id) for every token as it is drawn
    (streaming output).
    """
    per_prompt = _per_prompt_params(params, len(prompts))
    _check_prompts(prompts, model.config.vocab_size, max_tokens)
    stop = _stop_ids(eos_token_id, model.config.eos_token_ids)
    if not prompts:
        return []
    with inference():  # no autograd bookkeeping: this only infers
        cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + max_tokens)
        slots = [cache.allocate() for _ in prompts]
        sampler = Sampler()
        outputs: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        logits = model.forward(Batch(slots, [list(p) for p in prompts]), cache, experts)  # [B, V]
        while active:
            still = []
            for row, i in enumerate(active):
                token = sampler.sample(logits[row], per_prompt[i], key=i)
                outputs[i].append(token)
                if on_token is not None:
                    on_token(i, token)
                if token not in stop and len(outputs[i]) < max_tokens:
                    still.append(i)
            active = still
            if active:
                batch = Batch([slots[i] for i in active], [[outputs[i][-1]] for i in active])
                logits = model.forward(batch, cache, experts)
        return outputs


def _per_prompt_params(params: list[SamplingParams] | SamplingParams, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InputError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
    return list(params)


def _check_prompts(prompts: list[list[int]], vocab_size: int, max_tokens: int) -> None:
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"prompt {i} is empty; a prompt needs at least one token id")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")


def _stop_ids(eos_token_id: int | Sequence[int] | None, default: tuple[int, ...]) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset(default)
    if isinstance(eos_token_id, int):
        return frozenset((eos_token_id,))
    return frozenset(eos_token_id)
