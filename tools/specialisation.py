"""Evidence that the demo model's experts specialise by domain, always against the same
architecture at random initialisation, plus held-out loss per domain.

On the first ``--windows`` held-out windows (256 tokens) of every domain:

- routing (Prism's own model, ``shared.model``, teacher-forced): per MoE layer and domain, the
  expert-usage distribution p[d, l, :] (each of a token's top-k choices counts once). From it: the
  mean Jensen-Shannon divergence (bits, 0..1) and total variation between the domains' pairs, the
  share of a domain's activations taken by its top-25% experts (uniform = 0.25), the normalised
  entropy, the busiest expert over the mean, and the hit rate of a 25% expert cache chosen for one
  domain on that domain vs on the others;
- loss (transformers, the numerical reference): mean next-token cross-entropy (nats/token) of the
  trained MoE, the dense model of the same active size, the random-init MoE, and two unigram
  baselines (pooled train split; the domain's own train split), all with add-one smoothing.

Usage: ``python -m tools.specialisation [--model models/demo] [--random var/train/moe/init]
[--dense var/train/dense/final] [--windows 64] [--out var/specialisation.json]``, or
``python -m tools.specialisation --traces A.npz B.npz`` for the same statistics between the nodes
of routing traces.

Shape legend: Dm domains, L MoE layers, E experts per layer, K top-k, W windows, S window length.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.demo_data import heldout_windows, streams, unigram_log_probs

SEQ_LEN = 256


def routing_counts(model_dir: Path, windows: dict[str, torch.Tensor]) -> np.ndarray:
    """counts [Dm, L, E]: top-k choices per domain, MoE layer and expert (Prism's model)."""
    from cli.trace import RoutingRecorder
    from shared.model.model import Batch, MoEModel
    from shared.model.moe import LocalExperts

    model = MoEModel.from_checkpoint(model_dir)
    recorder = RoutingRecorder(LocalExperts.from_checkpoint(model_dir), model.config.moe_layers)
    E, L = model.config.num_experts, len(model.config.moe_layers)
    counts = np.zeros((len(windows), L, E))
    with torch.inference_mode():
        for d, rows in enumerate(windows.values()):
            for row in rows:
                cache = model.new_cache(1, SEQ_LEN)
                model.forward(Batch([cache.allocate()], [row.tolist()]), cache, recorder)
                experts, _ = recorder.take()  # [S, L, K]
                for layer in range(L):
                    counts[d, layer] += np.bincount(experts[:, layer].ravel(), minlength=E)
    return counts


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return (kl(p) + kl(q)) / 2


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row of p [R, E]: [R]."""
    logs = np.log2(np.where(p > 0, p, 1.0))
    return np.asarray(-(p * logs).sum(axis=1))


def layer_stats(counts: np.ndarray) -> dict[str, float]:
    """Statistics of one layer from counts [Dm, E] (see the module docstring)."""
    p = counts / counts.sum(axis=1, keepdims=True)  # [Dm, E]
    E = p.shape[1]
    top = max(1, E // 4)
    pairs = list(itertools.combinations(range(len(p)), 2))
    caches = np.argsort(-p, axis=1, kind="stable")[:, :top]  # [Dm, top] each domain's 25% cache
    own = [p[d, caches[d]].sum() for d in range(len(p))]
    other = [p[o, caches[d]].sum() for d in range(len(p)) for o in range(len(p)) if o != d]
    entropy = _entropy_bits(p) / math.log2(E)  # [Dm]
    pooled = p.mean(axis=0)  # [E] domains weighted equally
    return {
        # I(domain; expert) = H(pooled) - mean H(p_d): bits an expert choice tells about the domain
        "mutual_information_bits": float(_entropy_bits(pooled[None])[0] - _entropy_bits(p).mean()),
        "pooled_top25_share": float(np.sort(pooled)[::-1][:top].sum()),
        "js_bits": float(np.mean([_js_bits(p[a], p[b]) for a, b in pairs])),
        "total_variation": float(np.mean([0.5 * np.abs(p[a] - p[b]).sum() for a, b in pairs])),
        "top25_share": float(np.mean(own)),
        "top25_share_min": float(np.min(own)),
        "top25_share_max": float(np.max(own)),
        "cache_hit_other": float(np.mean(other)),
        "normalised_entropy": float(np.mean(entropy)),
        "busiest_over_mean": float(np.mean(p.max(axis=1) * E)),
    }


def routing_report(counts: np.ndarray, layers: list[int]) -> dict[str, Any]:
    """Per-layer statistics plus their means over layers, and each domain's top-25% share per layer."""
    per_layer = [layer_stats(counts[:, i]) for i in range(counts.shape[1])]
    mean = {k: float(np.mean([s[k] for s in per_layer])) for k in per_layer[0]}
    return {"layers": layers, "per_layer": per_layer, "mean": mean}


def trace_report(path: Path) -> dict[str, Any]:
    """The routing statistics of a `prism trace` file with nodes in place of domains."""
    from services.placement.traces import RoutingTrace

    trace = RoutingTrace.load(path)
    report = routing_report(trace.counts(), list(trace.meta.moe_layers))
    return {"trace": str(path), "tokens": trace.num_tokens, "nodes": list(trace.meta.nodes), **report}


def model_losses(model_dir: Path, windows: dict[str, torch.Tensor], batch: int = 8) -> dict[str, float]:
    """Mean next-token cross-entropy (nats/token) per domain, with transformers in fp32."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = {}
    with torch.inference_mode():
        for domain, rows in windows.items():
            total, count = 0.0, 0
            for start in range(0, len(rows), batch):
                x = rows[start:start + batch]
                logits = model(input_ids=x).logits[:, :-1]  # [W, S-1, V]
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                        reduction="sum")
                total, count = total + float(nll), count + x[:, 1:].numel()
            out[domain] = total / count
    return out


def unigram_losses(train: dict[str, np.ndarray], windows: dict[str, torch.Tensor], vocab: int) -> dict[str, Any]:
    """Cross-entropy of the pooled and of the own-domain unigram on the same targets."""
    pooled = unigram_log_probs(train, vocab)
    result: dict[str, dict[str, float]] = {"pooled": {}, "own_domain": {}}
    for domain, rows in windows.items():
        targets = rows[:, 1:].reshape(-1)
        own = unigram_log_probs({domain: train[domain]}, vocab)
        result["pooled"][domain] = float(-pooled[targets].mean())
        result["own_domain"][domain] = float(-own[targets].mean())
    return result


def _row(name: str, values: list[float], fmt: str = "{:.3f}") -> str:
    return f"| {name} | " + " | ".join(fmt.format(v) for v in values) + " |"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables in Markdown (the numbers docs/demo-model.md quotes)."""
    domains = list(report["loss"]["moe"])
    lines = ["Held-out loss (nats/token):", "", "| model | " + " | ".join(domains) + " | mean |",
             "|---|" + "---|" * (len(domains) + 1)]
    rows = [("trained MoE", report["loss"]["moe"]), ("dense, same active size", report["loss"].get("dense")),
            ("MoE at random init", report["loss"]["random"]), ("unigram, pooled", report["loss"]["unigram"]["pooled"]),
            ("unigram, own domain", report["loss"]["unigram"]["own_domain"])]
    for name, losses in rows:
        if losses:
            values = [losses[d] for d in domains]
            lines.append(_row(name, [*values, float(np.mean(values))]))
    keys = ["mutual_information_bits", "js_bits", "total_variation", "top25_share", "cache_hit_other",
            "pooled_top25_share", "normalised_entropy", "busiest_over_mean"]
    for which in ("trained", "random"):
        routing = report["routing"][which]
        lines += ["", f"Routing, {which} model (per MoE layer; mean over layers last):", "",
                  "| statistic | " + " | ".join(f"layer {i}" for i in routing["layers"]) + " | mean |",
                  "|---|" + "---|" * (len(routing["layers"]) + 1)]
        for key in keys:
            lines.append(_row(key, [s[key] for s in routing["per_layer"]] + [routing["mean"][key]]))
    return "\n".join(lines)


def traces_markdown(reports: list[dict[str, Any]]) -> str:
    """One row per trace: its statistics averaged over MoE layers, between nodes."""
    keys = ["mutual_information_bits", "total_variation", "top25_share", "cache_hit_other", "pooled_top25_share"]
    lines = ["Routing per node of `prism trace` files (mean over MoE layers):", "",
             "| trace | tokens | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in reports:
        lines.append(f"| {r['trace']} | {r['tokens']} | " + " | ".join(f"{r['mean'][k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = args.model / "tokenizer.json"
    heldout = streams(args.corpus, tokenizer, "heldout")
    windows = {d: heldout_windows(s, SEQ_LEN, args.windows) for d, s in heldout.items()}
    train = streams(args.corpus, tokenizer, "train")
    config = json.loads((args.model / "config.json").read_text())
    vocab, layers = int(config["vocab_size"]), list(range(int(config["num_hidden_layers"])))
    report: dict[str, Any] = {
        "windows_per_domain": {d: int(w.shape[0]) for d, w in windows.items()}, "window_tokens": SEQ_LEN,
        "loss": {"moe": model_losses(args.model, windows), "random": model_losses(args.random, windows),
                 "unigram": unigram_losses(train, windows, vocab)},
        "routing": {"trained": routing_report(routing_counts(args.model, windows), layers),
                    "random": routing_report(routing_counts(args.random, windows), layers)},
    }
    if args.dense is not None:
        report["loss"]["dense"] = model_losses(args.dense, windows)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/demo"))
    parser.add_argument("--random", type=Path, default=Path("var/train/moe/init"))
    parser.add_argument("--dense", type=Path, default=Path("var/train/dense/final"))
    parser.add_argument("--corpus", type=Path, default=Path("var/corpus"))
    parser.add_argument("--windows", type=int, default=64, help="held-out windows of 256 tokens per domain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("var/specialisation.json"))
    parser.add_argument("--traces", type=Path, nargs="*", default=[],
                        help="only report the per-node routing statistics of these prism trace files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.traces:
        print(traces_markdown([trace_report(t) for t in args.traces]))
        return 0
    if args.dense is not None and not args.dense.is_dir():
        print(f"no dense model at {args.dense}; its losses are left out", file=sys.stderr)
        args.dense = None
    report = evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
