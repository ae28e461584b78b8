"""Independent runs side by side, one process and one torch thread each: on a few cores that
beats one run at a time on every core (the small detectors here scale badly across threads), and
CPU-time budgets stay fair because each process counts only its own CPU."""

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def side_by_side(fn: Callable, jobs: list[tuple]) -> Iterator:
    """Yields `fn(*job)` for every job as each finishes (spawned workers: no forked torch)."""
    workers = min(len(jobs), os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
        for done in as_completed([pool.submit(fn, *job) for job in jobs]):
            yield done.result()
