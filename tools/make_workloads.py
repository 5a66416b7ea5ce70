"""Cut the per-domain prompt sets of ``workloads/prompts/`` from the corpus held-out split.

Each prompt is the first n tokens (n drawn in [20, 60]) of a span that starts at a line start of
a held-out document, at most two prompts per document; spans that are mostly blank, hold an
incomplete UTF-8 character or re-tokenise outside [20, 60] are skipped. Seeded per domain, so the
same corpus, tokenizer and seed give the same files.

Usage: ``python -m tools.make_workloads [--corpus var/corpus] [--tokenizer var/tokenizer.json] [--per-domain 48]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer

from tools.demo_data import domains_of

MIN_TOKENS, MAX_TOKENS = 20, 60
PER_DOC = 2


def _line_starts(text: str, tail: int) -> list[int]:
    """Offsets of line starts that leave at least `tail` characters after them."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    return [s for s in starts if len(text) - s >= tail and not text[s:s + 1].isspace()]


def _prompt(tok: Tokenizer, text: str, start: int, n: int) -> tuple[str, int] | None:
    """The decoded first n tokens of text[start:], with its re-encoded length; None if unfit."""
    ids = tok.encode(text[start:start + 20 * MAX_TOKENS]).ids
    if len(ids) < n:
        return None
    prompt = tok.decode(ids[:n])
    solid = sum(not c.isspace() for c in prompt)
    length = len(tok.encode(prompt).ids)
    if "\ufffd" in prompt or solid * 2 < len(prompt) or not MIN_TOKENS <= length <= MAX_TOKENS:
        return None
    return prompt, length


def domain_prompts(tok: Tokenizer, docs: list[dict[str, str]], count: int, seed: int) -> list[dict[str, object]]:
    """Up to `count` prompts from `docs` (held-out documents), seeded."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    prompts: list[dict[str, object]] = []
    for _ in range(PER_DOC):
        for i in order:
            starts = _line_starts(docs[i]["text"], 200)
            if not starts or len(prompts) >= count:
                continue
            start = rng.choice(starts)
            found = _prompt(tok, docs[i]["text"], start, rng.randint(MIN_TOKENS, MAX_TOKENS))
            if found and all(p["text"] != found[0] for p in prompts):
                prompts.append({"text": found[0], "tokens": found[1], "source": docs[i]["source"]})
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("var/corpus"))
    parser.add_argument("--tokenizer", type=Path, default=Path("var/tokenizer.json"))
    parser.add_argument("--out", type=Path, default=Path("workloads/prompts"))
    parser.add_argument("--per-domain", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tok = Tokenizer.from_file(str(args.tokenizer))
    args.out.mkdir(parents=True, exist_ok=True)
    for domain in domains_of(args.corpus):
        with (args.corpus / domain / "heldout.jsonl").open(encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh]
        prompts = domain_prompts(tok, docs, args.per_domain, args.seed * 1000 + domains_of(args.corpus).index(domain))
        body = {
            "domain": domain,
            "origin": "held-out split of the demo corpus (tools/build_corpus.py), cut by tools/make_workloads.py",
            "seed": args.seed,
            "tokens": "counted with models/demo/tokenizer.json",
            "prompts": prompts,
        }
        (args.out / f"{domain}.json").write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
        print(f"{domain:7s} {len(prompts)} prompts, {sum(int(str(p['tokens'])) for p in prompts)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
