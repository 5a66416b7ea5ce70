"""OpenAI-compatible HTTP API: translates /v1/completions and /v1/chat/completions onto `prism.v1.infer.<node>`."""
