"""Train the demo model's byte-level BPE tokenizer on the corpus train split.

Every domain contributes the same number of characters (the smallest domain's train size), so
the vocabulary is not dominated by the largest domain. ``<|endoftext|>`` is token 0 and is used
as EOS and as the separator between documents.

Usage: ``python tools/train_tokenizer.py [--corpus var/corpus] [--vocab 4096] [--out var/tokenizer.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def read_docs(corpus: Path, domain: str, split: str) -> list[str]:
    """Texts of <corpus>/<domain>/<split>.jsonl in file order."""
    with (corpus / domain / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def domains_of(corpus: Path) -> list[str]:
    """Domain names in the manifest's order."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    return list(manifest["domains"])


def balanced_texts(corpus: Path) -> Iterator[str]:
    """Train documents of every domain, each domain cut to the smallest domain's character count."""
    per_domain = {d: read_docs(corpus, d, "train") for d in domains_of(corpus)}
    budget = min(sum(len(t) for t in texts) for texts in per_domain.values())
    for texts in per_domain.values():
        used = 0
        for text in texts:
            if used >= budget:
                break
            yield text[: budget - used]
            used += len(text)


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(balanced_texts(corpus), trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("var/corpus"))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("var/tokenizer.json"))
    args = parser.parse_args(argv)
    tok = train(args.corpus, args.vocab)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    for domain in domains_of(args.corpus):
        texts = read_docs(args.corpus, domain, "heldout")
        chars = sum(len(t) for t in texts)
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
        print(f"{domain:7s} held-out: {chars / tokens:.2f} chars/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
