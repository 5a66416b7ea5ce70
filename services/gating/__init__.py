"""Gating service: intake, dense forward with continuous batching, dispatch of token groups to experts."""
