"""Services compute in torch's inference mode for good: on their loop's thread and their worker threads."""

from __future__ import annotations

import threading

import pytest
import torch

from shared.model import inference as inference_module
from shared.model.inference import executor, inference, inference_only, use_threads


def test_a_thread_put_in_inference_mode_stays_there_and_others_do_not() -> None:
    seen: dict[str, bool] = {}

    def service_thread() -> None:
        inference_only()
        inference_only()  # idempotent
        seen["after"] = torch.is_inference_mode_enabled()
        seen["tensor"] = torch.ones(2).is_inference()

    thread = threading.Thread(target=service_thread)
    thread.start()
    thread.join()
    assert seen == {"after": True, "tensor": True}
    assert not torch.is_inference_mode_enabled()  # this thread was left alone


def test_a_worker_pool_computes_in_inference_mode() -> None:
    pool = executor("test")
    try:
        assert pool.submit(torch.is_inference_mode_enabled).result(timeout=10)
        made = pool.submit(torch.ones, 3).result(timeout=10)
        assert made.is_inference()
    finally:
        pool.shutdown()


def test_inference_blocks_enter_the_mode_only_where_it_is_off() -> None:
    assert not torch.is_inference_mode_enabled()
    with inference():
        assert torch.is_inference_mode_enabled()
        assert torch.zeros(1).is_inference()
    assert not torch.is_inference_mode_enabled()
    assert not torch.zeros(1).is_inference()


def test_small_steps_and_big_ones_compute_with_their_own_thread_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference_module, "_worker_threads", 0)  # restored after the test
    seen: dict[str, int] = {}

    def event_loop_thread() -> None:
        use_threads(1, 2)
        pool = executor("big")
        try:
            seen["worker"] = pool.submit(torch.get_num_threads).result(timeout=10)
        finally:
            pool.shutdown()
        seen["loop"] = torch.get_num_threads()  # unmoved by the worker's own setting

    thread = threading.Thread(target=event_loop_thread)
    thread.start()
    thread.join()
    torch.set_num_threads(1)  # this process's tests run on one (conftest)
    assert seen == {"worker": 2, "loop": 1}
