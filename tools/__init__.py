"""Offline tools that build the demo model: corpus, tokenizer, training, evaluation (run with `python -m`)."""
