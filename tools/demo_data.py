"""Token streams of the demo corpus and the batches cut from them.

Each domain's split is one stream of token ids: every document preceded by EOS (id 0), in
corpus order. Streams are cached as ``<corpus>/tokens/<domain>.<split>.npy`` next to a sha256 of
the tokenizer, so a new tokenizer re-tokenises. Batches are a pure function of (seed, step), so a
run is reproducible and can resume at any step without saving the sampler's state.

Shape legend: B sequences in a batch, S tokens per sequence, W held-out windows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

EOS_ID = 0


def domains_of(corpus: Path) -> list[str]:
    """Domain names in the manifest's order."""
    return list(json.loads((corpus / "manifest.json").read_text())["domains"])


def _encode(corpus: Path, tokenizer: Tokenizer, domain: str, split: str) -> np.ndarray:
    with (corpus / domain / f"{split}.jsonl").open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(EOS_ID)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def token_stream(corpus: Path, tokenizer_file: Path, domain: str, split: str) -> np.ndarray:
    """[N] uint16 token ids of one domain's split (cached under <corpus>/tokens)."""
    digest = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()[:16]
    cache = corpus / "tokens" / f"{domain}.{split}.{digest}.npy"
    if cache.is_file():
        cached: np.ndarray = np.load(cache)
        return cached
    stream = _encode(corpus, Tokenizer.from_file(str(tokenizer_file)), domain, split)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, stream)
    return stream


def streams(corpus: Path, tokenizer_file: Path, split: str) -> dict[str, np.ndarray]:
    """{domain: [N] uint16} for every domain of the corpus."""
    return {d: token_stream(corpus, tokenizer_file, d, split) for d in domains_of(corpus)}


def train_batch(
    domain_streams: dict[str, np.ndarray], seed: int, step: int, per_domain: int, seq_len: int
) -> torch.Tensor:
    """[B, S] int64: per_domain random windows from every domain (domain-balanced), domain-major."""
    rng = np.random.default_rng([seed, step])
    rows: list[np.ndarray] = []
    for stream in domain_streams.values():
        starts = rng.integers(0, len(stream) - seq_len, size=per_domain)
        rows.extend(stream[s : s + seq_len] for s in starts)
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def heldout_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """[W, S] int64: consecutive non-overlapping windows from the start of a held-out stream."""
    count = min(max_windows, len(stream) // seq_len)
    return torch.from_numpy(stream[: count * seq_len].astype(np.int64).reshape(count, seq_len))


def unigram_log_probs(domain_streams: dict[str, np.ndarray], vocab_size: int) -> torch.Tensor:
    """[V] log-probabilities of the pooled train tokens with add-one smoothing (the unigram baseline)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for stream in domain_streams.values():
        counts += np.bincount(stream, minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(np.log(counts / counts.sum()))
