"""Prism's model core against transformers: prefill and decode tokens/s, measured in one run.

    .venv/bin/python bench/model_core.py [--configs tiny,mixtral-100m] [--reps 3] [--threads 1]
                                         [--device cpu|cuda] [--dtype fp32|bf16]

For each config a random Mixtral-shaped checkpoint is built with transformers and saved; Prism
loads it (dense model + LocalExperts), transformers loads the same files (its default attention
and experts implementations). Both run under `torch.inference_mode()` with the same thread count.

- prefill: one forward over `batch` prompts of `prompt` tokens each (Prism packs them, ragged-
  capable; transformers takes a [batch, prompt] tensor); tokens/s = batch * prompt / time.
- decode: after a prefill, `steps` one-token steps for all `batch` sequences with the KV cache;
  tokens/s = batch * steps / time.

Each cell is the best of `--reps` runs, Prism and transformers interleaved (the machine is shared),
ratio = Prism / transformers (> 1: Prism is faster). Goal: ratio >= 1 / 1.2 = 0.83 everywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.model.model import Batch, MoEModel
from shared.model.moe import LocalExperts
from tests.checkpoints import make_tiny_checkpoint

# name -> (checkpoint overrides of tests/checkpoints.py's tiny Mixtral, prompt length, decode steps)
CONFIGS: dict[str, tuple[dict[str, Any], int, int]] = {
    "tiny": ({}, 64, 32),
    "mixtral-100m": (
        {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 6,
         "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
         "max_position_embeddings": 4096, "initializer_range": 0.02},
        128, 16,
    ),
}
BATCHES = (1, 16)


class Runner:
    """One implementation's prefill and decode on a batch of prompts."""

    def __init__(self, prefill: Callable[[list[list[int]]], Any], decode: Callable[[Any, int], None]) -> None:
        self.prefill = prefill
        self.decode = decode


def prism_runner(path: Path, dtype: torch.dtype, device: str, max_len: int) -> Runner:
    model = MoEModel.from_checkpoint(path, dtype=dtype, device=device)
    experts = LocalExperts.from_checkpoint(path, dtype=dtype, device=device)

    def prefill(prompts: list[list[int]]) -> Any:
        cache = model.new_cache(len(prompts), max_len)
        slots = [cache.allocate() for _ in prompts]
        logits = model.forward(Batch(slots, prompts), cache, experts)
        return cache, slots, logits.argmax(-1).tolist()

    def decode(state: Any, steps: int) -> None:
        cache, slots, tokens = state
        for _ in range(steps):
            logits = model.forward(Batch(slots, [[t] for t in tokens]), cache, experts)
            tokens = logits.argmax(-1).tolist()

    return Runner(prefill, decode)


def hf_runner(path: Path, dtype: torch.dtype, device: str) -> Runner:
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype).to(device).eval()

    def prefill(prompts: list[list[int]]) -> Any:
        out = model(torch.tensor(prompts, device=device), use_cache=True, logits_to_keep=1)
        return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(state: Any, steps: int) -> None:
        cache, tokens = state
        for _ in range(steps):
            out = model(tokens, cache=cache, use_cache=True)
            cache, tokens = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)

    return Runner(prefill, decode)


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def measure(runners: dict[str, Runner], prompts: list[list[int]], steps: int, reps: int, device: str) -> dict[str, Any]:
    """Best prefill and decode seconds per runner, interleaving runners in every repetition."""
    best = {name: [float("inf"), float("inf")] for name in runners}
    for rep in range(reps + 1):  # repetition 0 warms up (allocations, kernel selection)
        for name, runner in runners.items():
            seconds, state = _timed(lambda r=runner: r.prefill(prompts), device)
            decode_s, _ = _timed(lambda r=runner, s=state: r.decode(s, steps), device)
            if rep:
                best[name] = [min(best[name][0], seconds), min(best[name][1], decode_s)]
    return best


def bench_config(name: str, reps: int, dtype: torch.dtype, device: str, workdir: Path) -> list[list[str]]:
    overrides, prompt_len, steps = CONFIGS[name]
    path = make_tiny_checkpoint("mixtral", workdir / name, seed=0, **overrides)
    vocab = int(overrides.get("vocab_size", 320))
    g = torch.Generator().manual_seed(0)
    runners = {
        "prism": prism_runner(path, dtype, device, prompt_len + steps + 1),
        "hf": hf_runner(path, dtype, device),
    }
    params = sum(p.numel() for p in runners_params(path))
    rows = []
    for batch in BATCHES:
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()
        best = measure(runners, prompts, steps, reps, device)
        for phase, index, tokens in (("prefill", 0, batch * prompt_len), ("decode", 1, batch * steps)):
            ours, theirs = tokens / best["prism"][index], tokens / best["hf"][index]
            rows.append([name, f"{params / 1e6:.1f}M", phase, str(batch), str(tokens),
                         f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def runners_params(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return [t for f in sorted(path.glob("*.safetensors")) for t in load_file(f).values()]


def _cpu_name() -> str:
    """CPU model and core count, e.g. 'AMD EPYC (2 cores)'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma separated: " + ", ".join(CONFIGS))
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per cell (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    import transformers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    print(f"machine: {device_name}, {args.threads} torch thread(s), device {args.device}, "
          f"{args.dtype}; torch {torch.__version__}, transformers {transformers.__version__}")
    header = ["config", "params", "phase", "batch", "tokens", "prism tok/s", "transformers tok/s", "ratio"]
    print(" | ".join(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in args.configs.split(","):
            rows += bench_config(name, args.reps, dtype, args.device, Path(tmp))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
    worst = min(float(r[-1]) for r in rows)
    print(f"\nworst ratio {worst:.2f} (goal >= {1 / 1.2:.2f})")


if __name__ == "__main__":
    main()
