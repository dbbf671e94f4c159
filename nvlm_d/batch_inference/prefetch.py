"""Loading ahead: requests' images decoded and tiled in worker threads while the model answers earlier requests,
never more than a fixed number ahead, so that memory stays bounded whatever the length of the input."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Prefetcher(Generic[T, R]):
    """`load(item)` for every item, in a pool of `workers` threads, at most `ahead` items in front of the consumer;
    iterating yields the results in input order (an exception of `load` is raised where its result is taken).

    While the consumer works on item k, items k+1 .. k+ahead are being loaded: never more, so memory is bounded
    by what `ahead` loaded items hold. `ahead=0` loads each item on the consumer's thread when it is taken.
    """

    def __init__(self, items: Iterable[T], load: Callable[[T], R], ahead: int, workers: int) -> None:
        if ahead < 0 or workers < 1:
            raise ValueError(f"need ahead >= 0 and workers >= 1, got ahead={ahead}, workers={workers}")
        self._items = iter(items)
        self._load = load
        self.ahead = ahead
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="nvlm_d-load") if ahead else None
        self._pending: collections.deque[Future] = collections.deque()
        self.submitted = 0  # items handed to `load` so far

    def __iter__(self) -> Iterator[R]:
        if self._pool is None:
            for item in self._items:
                self.submitted += 1
                yield self._load(item)
            return
        try:
            while True:
                for item in itertools.islice(self._items, self.ahead + 1 - len(self._pending)):
                    self._pending.append(self._pool.submit(self._load, item))
                    self.submitted += 1
                if not self._pending:
                    return
                yield self._pending.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the loads that have not started; a load in progress finishes on its own, unwaited for."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
