"""`prism run`: generate with one model in this process (no NATS), as a reference and a demo.

    prism run [--model DIR] (--prompt TEXT | --input-ids 1,2,3) [--max-tokens N]
              [--temperature T] [--top-p P] [--seed S] [--dtype auto|fp32|bf16|fp16]
              [--device cpu|cuda] [--ignore-eos] [--json]

DIR is a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json); it
defaults to the bundled demo model `models/demo` when that exists. `--dtype auto` (the default)
computes in the dtype config.json names (`dtype` / `torch_dtype`), as transformers does, else fp32.
Without `--json` the generated text is streamed to stdout. With `--json` one JSON object is
printed: `token_ids` (generated ids), `text` (their decoding; null when the checkpoint has no
tokenizer.json and ids were given),
`prompt_ids`, `finish_reason` ("stop" at an end-of-sequence id, else "length"), `usage` and
`timings` (seconds). Greedy decoding (temperature 0, the default) is deterministic; a distributed
Prism run must produce the same `token_ids`.

Errors (missing directory, unsupported architecture, bad ids, no CUDA) are one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli import DEMO_MODEL

EXIT_BAD_INPUT = 2
DTYPES = ("auto", "fp32", "bf16", "fp16")
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="generate with a model in this process (no NATS)")
    default = str(DEMO_MODEL) if DEMO_MODEL.is_dir() else None
    p.add_argument("--model", default=default,
                   help="checkpoint directory" + (f" (default: {default})" if default else " (required)"))
    p.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer.json)")
    p.add_argument("--input-ids", help="prompt token ids, comma separated, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (sampling only)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="compute dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N also accepted)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=handler)


class UsageError(ValueError):
    """A command-line value is wrong (reported like a model error: one line, exit 2)."""


def _fail(message: str) -> int:
    print(f"prism run: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def handler(args: argparse.Namespace) -> int:
    from shared.model.errors import ModelError

    try:
        _check_args(args)
        return _run(args)
    except (ModelError, UsageError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # unreadable files surface here
        return _fail(f"cannot read the model: {exc}")


def _check_args(args: argparse.Namespace) -> None:
    if args.model is None:
        raise UsageError(f"--model DIR is required (no bundled demo model at {DEMO_MODEL})")
    if (args.prompt is None) == (args.input_ids is None):
        raise UsageError("give exactly one of --prompt TEXT or --input-ids 1,2,3")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not (args.device in {"cpu", "cuda"} or args.device.startswith("cuda:")):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")


def parse_ids(text: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; raises UsageError naming the bad part."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError("--input-ids is empty; give comma-separated token ids, e.g. 1,2,3")
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--input-ids must be comma-separated integers, got {text!r}") from None
    negative = [i for i in ids if i < 0]
    if negative:
        raise UsageError(f"--input-ids must be >= 0, got {negative[:5]}")
    return ids


def _run(args: argparse.Namespace) -> int:
    from shared.model.generate import generate
    from shared.model.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    started = time.perf_counter()
    model_dir = Path(args.model)
    tokenizer = _tokenizer(model_dir, needed=args.prompt is not None)
    prompt = tokenizer.encode(args.prompt) if tokenizer and args.prompt is not None else parse_ids(args.input_ids)
    if not prompt:
        raise UsageError("the prompt encodes to no tokens; give a longer --prompt")
    model, experts = _load(model_dir, args.dtype, args.device)
    room = model.config.max_position_embeddings - len(prompt)  # as a gating caps a request: the model's context
    if room < 1:
        raise UsageError(f"the prompt has {len(prompt)} tokens; the model's context is "
                         f"{model.config.max_position_embeddings}")
    loaded = time.perf_counter()
    stream = tokenizer.stream() if tokenizer and not args.json else None

    def show(_: int, token: int) -> None:
        if stream is not None:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    eos: list[int] | None = [] if args.ignore_eos else None
    ids = generate(model, experts, [prompt], min(args.max_tokens, room), params, eos_token_id=eos, on_token=show)[0]
    done = time.perf_counter()
    if not args.json:
        sys.stdout.write((stream.flush() if stream else " ".join(map(str, ids))) + "\n")
        return 0
    stopped = not args.ignore_eos and bool(ids) and ids[-1] in model.config.eos_token_ids
    print(json.dumps({
        "model": str(model_dir),
        "prompt_ids": prompt,
        "token_ids": ids,
        "text": tokenizer.decode(ids) if tokenizer else None,
        "finish_reason": "stop" if stopped else "length",
        "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids)},
        "timings": {"load_s": round(loaded - started, 4), "generate_s": round(done - loaded, 4),
                    "tokens_per_s": round(len(ids) / max(done - loaded, 1e-9), 2)},
    }))
    return 0


def _load(model_dir: Path, dtype_name: str, device: str) -> tuple[Any, Any]:
    """The dense model and all routed experts of `model_dir`."""
    import torch

    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    if dtype_name == "auto":
        dtype_name = checkpoint_dtype(model_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    model = MoEModel.from_checkpoint(model_dir, dtype=dtype, device=device)
    return model, LocalExperts.from_checkpoint(model_dir, dtype=dtype, device=device)


def _tokenizer(model_dir: Path, needed: bool) -> Any:
    """The checkpoint's tokenizer, or None when it has none and ids were given."""
    from shared.model.errors import CheckpointError
    from shared.model.tokenizer import Tokenizer

    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    if not needed and not (model_dir / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(model_dir)


def checkpoint_dtype(model_dir: Path) -> str:
    """fp32 / bf16 / fp16 as config.json's `dtype` (or older `torch_dtype`) says; fp32 otherwise."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "fp32"  # load_config reports a missing or broken config.json
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return _HF_DTYPES.get(str(name), "fp32")
