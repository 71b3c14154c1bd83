"""Host batches -> sharded jax.Arrays, `size` batches ahead, without losing exact resumption.

`jax.make_array_from_process_local_data` is asynchronous, so keeping `size` batches in flight overlaps the
host-to-device copy with the step. Prefetching reads ahead of what training consumed; to checkpoint the batch
training will see next (not the one the prefetcher will read next), the state of the host iterator is recorded
after each batch is read and `get_state` returns the state that belongs to the last batch handed out.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Mapping

import jax


def _to_device(batch: Mapping[str, Any], sharding: Any, global_batch: int | None) -> dict[str, jax.Array]:
  def put(key: str, value: Any) -> jax.Array:
    target = sharding[key] if isinstance(sharding, Mapping) else sharding
    # The global shape is given, not inferred: hosts that hold the same rows (a batch axis that does not span
    # every process) would otherwise be counted twice.
    shape = None if global_batch is None else (global_batch,) + tuple(value.shape[1:])
    return jax.make_array_from_process_local_data(target, value, shape)

  return {key: put(key, value) for key, value in batch.items()}


class DevicePrefetchIterator:
  """Iterator of device batches; checkpointable through the wrapped iterator's get_state/set_state.

  sharding: one jax.sharding.Sharding for every field (batch on the leading axis, as NamedSharding(mesh, P('data'))
  does for any rank), or a mapping field name -> Sharding.
  """

  def __init__(self, iterator: Iterator[Mapping[str, Any]], sharding: Any, size: int = 2,
               global_batch: int | None = None):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._iterator = iterator
    self._sharding = sharding
    self._size = size
    self._global_batch = global_batch
    self._queue: collections.deque = collections.deque()
    self._state: Any = None  # host-iterator state after the last batch handed out
    self._exhausted = False

  def _snapshot(self) -> Any:
    return self._iterator.get_state() if hasattr(self._iterator, "get_state") else None

  def _fill(self) -> None:
    if self._state is None:
      self._state = self._snapshot()
    while not self._exhausted and len(self._queue) < self._size:
      try:
        batch = next(self._iterator)
      except StopIteration:
        self._exhausted = True
        break
      self._queue.append((_to_device(batch, self._sharding, self._global_batch), self._snapshot()))

  def __iter__(self) -> "DevicePrefetchIterator":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    self._fill()
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    self._fill()
    return batch

  def get_state(self) -> Any:
    return self._state if self._state is not None else self._snapshot()

  def set_state(self, state: Any) -> None:
    self._queue.clear()
    self._exhausted = False
    self._iterator.set_state(state)
    self._state = state

  def start_prefetch(self) -> None:
    if hasattr(self._iterator, "start_prefetch"):
      self._iterator.start_prefetch()

  def close(self) -> None:
    self._queue.clear()
    if hasattr(self._iterator, "close"):
      self._iterator.close()

  def __enter__(self) -> "DevicePrefetchIterator":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __getattr__(self, name: str) -> Any:  # counters etc. of the host iterator (num_corrupt)
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._iterator, name)


def prefetch_to_device(iterator: Iterator[Mapping[str, Any]], sharding: Any, size: int = 2,
                       global_batch: int | None = None) -> DevicePrefetchIterator:
  """Wraps a host batch iterator (e.g. `make_train_iterator(...)`) so it yields sharded jax.Arrays.
  global_batch: the rows of the global batch (default: inferred, hosts holding disjoint equal slices)."""
  return DevicePrefetchIterator(iterator, sharding, size, global_batch)
