"""Copy the trained demo MoE into ``models/demo/`` with its metrics.

Copies ``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json`` and
``tokenizer_config.json`` from the training run's ``final/`` directory and writes ``metrics.json``:
the corpus summary (from the manifest), the training settings and curve summary (from
``log.jsonl``), and the evaluation of ``tools.specialisation`` (held-out losses, routing statistics).

Usage: ``python -m tools.ship_demo [--run var/train/moe] [--dense-run var/train/dense]
[--specialisation var/specialisation.json] [--out models/demo]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def corpus_summary(corpus: Path, tokenizer: Path) -> dict[str, Any]:
    """Per domain and split: documents, characters, bytes, tokens, and documents per source root."""
    from tools.demo_data import token_stream

    manifest = json.loads((corpus / "manifest.json").read_text())
    domains = {
        name: {
            split: {**{k: v for k, v in body.items() if k != "files"},
                    "tokens": len(token_stream(corpus, tokenizer, name, split))}
            for split, body in entry.items()
        }
        for name, entry in manifest["domains"].items()
    }
    keep = ("seed", "max_train_chars", "heldout_percent", "python")
    return {"builder": "tools/build_corpus.py", **{k: manifest[k] for k in keep}, "domains": domains}


def training_summary(run: Path) -> dict[str, Any]:
    """Steps, wall time and the last logged losses of a training run (from its log.jsonl)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    last = rows[-1]
    tail = rows[-5:]
    return {
        "steps": last["step"] + 1, "wall_s": last["elapsed_s"], "threads": 1,
        "train_loss_last_logged": round(sum(r["loss"] for r in tail) / len(tail), 4),
        "aux_loss_last_logged": round(sum(r["aux"] for r in tail) / len(tail), 4),
        "log": str(run / "log.jsonl"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("var/train/moe"))
    parser.add_argument("--dense-run", type=Path, default=Path("var/train/dense"))
    parser.add_argument("--corpus", type=Path, default=Path("var/corpus"))
    parser.add_argument("--specialisation", type=Path, default=Path("var/specialisation.json"))
    parser.add_argument("--out", type=Path, default=Path("models/demo"))
    parser.add_argument("--settings", type=str, default="", help="the training command line, for the record")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(args.run / "final" / name, args.out / name)
    weights = (args.out / "model.safetensors").read_bytes()
    metrics: dict[str, Any] = {
        "model": "Prism demo MoE (Mixtral family), trained by tools/train_demo.py",
        "model_safetensors_sha256": hashlib.sha256(weights).hexdigest(),
        "corpus": corpus_summary(args.corpus, args.out / "tokenizer.json"),
        "training": {"moe": training_summary(args.run), "settings": args.settings},
    }
    if (args.dense_run / "log.jsonl").is_file():
        metrics["training"]["dense"] = training_summary(args.dense_run)
    if args.specialisation.is_file():
        metrics["evaluation"] = json.loads(args.specialisation.read_text())
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"shipped {args.out}: {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
