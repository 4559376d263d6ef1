"""Worker processes that apply one function to a stream of items and hand the results back in input order.

For CPU work done once per image (decoding, re-encoding, region proposals) that would otherwise hold back the
main process: ``dsalign prepare --workers`` and ``dsalign features --workers``. Items travel in tasks of a few
(one task per item cost ~0.8 ms of the main process per item on submitting), a bounded number of tasks ahead of
the consumer, so memory stays flat on any stream length. Outputs equal those of calling the function in line.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

TASK_SIZE = 8  # items per task
_function: Callable[..., Any] | None = None  # the function of this worker process, set by _start


def _start(function: Callable[..., Any], parent: int) -> None:
    global _function
    _function = function
    if "torch" in sys.modules:  # many workers beside the main process's threads: one each, as DataLoader's do
        sys.modules["torch"].set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it stops the pool)
    threading.Thread(target=_exit_without, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_without(parent: int, poll_s: float = 0.5) -> None:
    """End this worker once its main process is gone (killed for memory, SIGKILL, SIGTERM): nothing would stop it
    otherwise, and it would keep the main process's stdout open (a ``| tee`` would never end)."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def _run_task(task: list[tuple]) -> list:
    assert _function is not None
    return [_function(*args) for args in task]


def _context() -> multiprocessing.context.BaseContext:
    """fork on Linux, as DataLoader workers: instant, and the function's state is inherited (workers must not
    touch CUDA, so a parent that holds a GPU context is fine); spawn elsewhere (fork is unsafe on macOS)."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class OrderedWorkers:
    """``workers`` processes running ``function``; started on the first :meth:`starmap`, stopped by :meth:`close`.

    ``ahead``: tasks in flight at most (default ``2 x workers``); ``on_death``: what a one-line error says to do
    when a worker dies (a native crash, the kernel's OOM killer). The pool then starts afresh on the next call.
    """

    def __init__(self, workers: int, function: Callable[..., Any], *, task_size: int = TASK_SIZE,
                 ahead: int | None = None, on_death: str = "rerun with fewer --workers if memory ran out"):
        if workers < 1 or task_size < 1:
            raise ValueError(f"need workers >= 1 and task_size >= 1, got {workers} and {task_size}")
        self.workers, self.function, self.task_size = workers, function, task_size
        self.ahead = 2 * workers if ahead is None else ahead
        self.on_death = on_death
        self._pool: ProcessPoolExecutor | None = None

    def starmap(self, arguments: Iterable[tuple]) -> Iterator:
        """``function(*args)`` for every tuple, in order."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_start,
                                             initargs=(self.function, os.getpid()))
        arguments = iter(arguments)
        pending: deque[Future] = deque()
        try:
            while task := list(itertools.islice(arguments, self.task_size)):
                pending.append(self._pool.submit(_run_task, task))
                while len(pending) > self.ahead:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool as exc:  # from submit or from a result, whichever came first after the death
            self.close()
            raise RuntimeError(f"a worker process died ({exc}); {self.on_death}") from exc
        finally:  # stopped early (an error, Ctrl-C, the consumer closed us): drop the queued work
            for future in pending:
                future.cancel()

    def close(self) -> None:
        """Stop the worker processes, if any started."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

