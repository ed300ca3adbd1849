"""Worker processes with one progress bar: how every simulated suite runs its independent runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Workers:
    """`map` submits every task at once (so several maps share the pool) and yields results in
    order, ticking the bar as each arrives; with one job it runs them here, in this process."""

    def __init__(self, pool: Executor | None, bar: Any) -> None:
        self._pool = pool
        self._bar = bar

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], chunksize: int = 1) -> Iterator[R]:
        results = self._pool.map(fn, tasks, chunksize=chunksize) if self._pool else map(fn, tasks)
        return self._ticking(results)

    def _ticking(self, results: Iterable[R]) -> Iterator[R]:
        for r in results:
            if self._bar is not None:
                self._bar.update()
            yield r


@contextmanager
def workers(jobs: int | None, total: int, desc: str, progress: bool = True) -> Iterator[Workers]:
    """A pool of `jobs` processes (default: all cores) and a tqdm bar of `total` runs, both closed on exit."""
    jobs = jobs or os.cpu_count() or 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="run", desc=desc, smoothing=0.05)
    pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None
    try:
        yield Workers(pool, bar)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()


def chunk_for(n: int, jobs: int | None, per_job: int, most: int | None = None) -> int:
    """Tasks per chunk: enough chunks per worker (`per_job`) to balance the load, at least 1."""
    jobs = jobs or os.cpu_count() or 1
    c = max(1, n // (jobs * per_job))
    return min(c, most) if most else c
