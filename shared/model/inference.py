"""Serving never trains: the threads that compute stay in torch's inference mode for good.

Entering `torch.inference_mode()` costs a few µs, about what a small expert computes, and a decode step
crosses between the dense part and the experts twice per MoE layer; outside it every op pays autograd's
bookkeeping. So a service puts its event loop's thread in inference mode once (`inference_only()` in
its `main`) and its worker threads too (`executor(...)`), and the code that may also run elsewhere
(tests, benchmarks, `prism run`) enters it only where it is not on (`inference`).

How many torch threads compute is per thread too: the event loop computes the small steps (a decode
step, a small block of expert rows), where OpenMP's fork and join cost more than a second core saves,
and the workers the big ones (a long prefill), where the second core pays. With torch's OpenMP backend
the count belongs to the OS thread, so `use_threads` sets the two apart.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.autograd import grad_mode

_thread = threading.local()
_worker_threads = 0  # torch threads of the workers `executor` starts; 0: torch's own default


def inference_only() -> None:
    """Put the calling thread in inference mode until it ends (idempotent)."""
    if not getattr(_thread, "guard", None):
        _thread.guard = grad_mode._enter_inference_mode(True)  # type: ignore[no-untyped-call]  # held for the thread's life


def use_threads(small: int, big: int) -> None:
    """Torch intra-op threads: `small` for the calling thread (the event loop's), `big` for the workers
    of `executor` pools (those started from now on; a service calls this first thing in its `main`)."""
    global _worker_threads  # noqa: PLW0603 - one setting per process, read by every worker as it starts
    _worker_threads = big
    _set_threads(small)


def _set_threads(n: int) -> None:
    # Torch sets a thread's count from a process-wide value the first time the thread asks for it: ask
    # first, so that a count set later by another thread does not replace this one.
    torch.get_num_threads()
    torch.set_num_threads(n)


def _start_worker() -> None:
    inference_only()
    if _worker_threads:
        _set_threads(_worker_threads)


def executor(name: str) -> ThreadPoolExecutor:
    """A one-thread pool for big steps whose thread computes in inference mode, with the workers' threads."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_start_worker)


def inference() -> contextlib.AbstractContextManager[object]:
    """Inference mode for a block, entered only where the thread is not in it already."""
    return contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode()
