"""Serving never trains: the threads that compute stay in torch's inference mode for good.

Entering `torch.inference_mode()` costs a few µs, about what a small expert computes, and a decode step
crosses between the dense part and the experts twice per MoE layer; outside it every op pays autograd's
bookkeeping. So a service puts its event loop's thread in inference mode once (`inference_only()` in
its `main`) and its worker threads too (`executor(...)`), and the code that may also run elsewhere
(tests, benchmarks, `prism run`) enters it only where it is not on (`inference`).
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.autograd import grad_mode

_thread = threading.local()


def inference_only() -> None:
    """Put the calling thread in inference mode until it ends (idempotent)."""
    if not getattr(_thread, "guard", None):
        _thread.guard = grad_mode._enter_inference_mode(True)  # type: ignore[no-untyped-call]  # held for the thread's life


def executor(name: str) -> ThreadPoolExecutor:
    """A one-thread pool for big steps whose thread computes in inference mode."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=inference_only)


def inference() -> contextlib.AbstractContextManager[object]:
    """Inference mode for a block, entered only where the thread is not in it already."""
    return contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode()
