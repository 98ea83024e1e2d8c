"""Batches for the coming steps, made in worker threads while the device trains.

Every training batch is a pure function of its step (``SyntheticLayers.train_batch``),
so making them ahead of time, in any order and in several threads, gives exactly the
batches of the synchronous loop: results and resumption are unchanged. numpy releases
the GIL inside its array loops, so rendering in threads runs in parallel; the copy to
the devices (``shard``) is done in the workers too.

Measured (benchmarks/input_pipeline.py): rendering a 128x128 batch of 64 took 66 ms
in one thread against a 34 ms training step on an H200, which would leave the GPU
waiting half the time without workers.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable


class Prefetcher:
  """``get(step)`` returns ``make(step)``; steps must be asked for in increasing order.

  ``depth`` batches are kept in flight ahead of the one asked for, on ``workers``
  threads. ``depth=0`` makes each batch when it is asked for, in the calling thread.
  """

  def __init__(self, make: Callable[[int], Any], start: int, stop: int, *, depth: int = 2,
               workers: int = 2):
    if depth < 0 or workers < 1:
      raise ValueError(f"depth must be >= 0 and workers >= 1, got depth={depth}, workers={workers}")
    self._make, self._stop, self._depth = make, stop, depth
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sils_input") if depth else None
    self._queue: collections.deque = collections.deque()
    self._next = start  # the next step to submit

  def _fill(self, upto: int) -> None:
    while self._next < min(upto, self._stop):
      self._queue.append((self._next, self._pool.submit(self._make, self._next)))
      self._next += 1

  def get(self, step: int) -> Any:
    if self._pool is None:
      return self._make(step)
    self._fill(step + 1 + self._depth)
    while self._queue and self._queue[0][0] < step:  # skipped steps
      self._queue.popleft()[1].cancel()
    if not self._queue or self._queue[0][0] != step:
      raise ValueError(f"Prefetcher: step {step} was asked for after a later step")
    return self._queue.popleft()[1].result()  # re-raises a worker's exception here

  def close(self) -> None:
    if self._pool is not None:
      for _, f in self._queue:
        f.cancel()
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
