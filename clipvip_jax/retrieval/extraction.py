"""Embedding extraction over many inputs with ONE compiled shape, split over every local device.

`extract_embeddings(model.encode_text, {"ids": ids, "mask": mask}, batch_size=256)` runs the encoder over
fixed-size batches; the last, short batch is padded (by repeating its last row, so no all-zero mask or empty
input reaches the model) and the padded rows are dropped from the result. Every call therefore sees the same
shape and jit compiles once, however many inputs there are. Evaluation, `encode` and search build on this.

`device_encoder(pretrained, "encode_video")` is the same model method with its parameters replicated once on
every local device and each batch split over them along its first axis (jax.sharding over jax.local_devices()),
so `encode` uses all of a host's accelerators (or XLA's simulated CPU devices) with no change to the results
beyond float rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

Batch = Mapping[str, Any]


def pad_batch(batch: Batch, batch_size: int) -> tuple[dict[str, np.ndarray], int]:
  """(batch padded to `batch_size` rows by repeating its last row, number of real rows)."""
  sizes = {k: len(v) for k, v in batch.items() if v is not None}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch arrays differ in their first dimension: {sizes}")
  n = next(iter(sizes.values()))
  if not 0 < n <= batch_size:
    raise ValueError(f"a batch of {n} rows does not fit batch_size {batch_size}")
  out = {}
  for k, v in batch.items():
    if v is None or n == batch_size:
      out[k] = v
    else:
      v = np.asarray(v)
      out[k] = np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)], axis=0)
  return out, n


def _slices(arrays: Mapping[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
  sizes = {k: len(v) for k, v in arrays.items() if v is not None}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"input arrays differ in their first dimension: {sizes}")
  n = next(iter(sizes.values()))
  for start in range(0, n, batch_size):
    yield {k: None if v is None else v[start:start + batch_size] for k, v in arrays.items()}


def extract_embeddings(encode_fn: Callable[..., Any], arrays: Mapping[str, Any] | Iterable[Batch],
                       batch_size: int, *, total: int | None = None, progress: bool = True,
                       desc: str = "embedding") -> Any:
  """Outputs of `encode_fn(**batch)` over all inputs, concatenated on the host as numpy.

  arrays: a dict of arrays [N, ...] (keyword names of `encode_fn`, e.g. {"video": v, "frame_mask": m}), or an
    iterable of such dicts with at most `batch_size` rows each (a data loader); `total` sizes the progress bar
    for an iterable.
  encode_fn: returns an array [B, ...] or a pytree of them (each gets concatenated); usually a method of
    `clipvip_jax.retrieval.pretrained.Pretrained`, `device_encoder(...)`, or a jitted function.
  Batches are dispatched before the previous result is copied to the host, so device work overlaps the copy.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if isinstance(arrays, Mapping):
    if not arrays or all(v is None for v in arrays.values()):
      raise ValueError("extract_embeddings: no input arrays given")
    total = len(next(v for v in arrays.values() if v is not None))
    batches: Iterable[Batch] = _slices(arrays, batch_size)
  else:
    batches = arrays
  pieces: list[Any] = []
  pending: tuple[Any, int] | None = None
  with tqdm(total=total, desc=desc, unit="item", disable=not progress) as bar:
    for batch in batches:
      padded, n = pad_batch(batch, batch_size)
      out = encode_fn(**padded)
      if pending is not None:
        pieces.append(_to_host(*pending))
      pending = (out, n)
      bar.update(n)
    if pending is not None:
      pieces.append(_to_host(*pending))
  if not pieces:
    raise ValueError("extract_embeddings: the input holds no rows")
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *pieces)


def _to_host(out: Any, n: int) -> Any:
  return jax.tree.map(lambda x: np.asarray(x)[:n], out)


def device_encoder(pretrained: Any, method: str, devices: list[Any] | None = None) -> Callable[..., Any]:
  """`f(**batch)`: `pretrained`'s jitted `method` (e.g. "encode_video", keyword names of the model method) with
  the parameters replicated on `devices` (default: this process's local devices) and every batch split over them.

  The batch size must be a multiple of len(devices) (`round_batch_size`). The parameters are placed once here,
  not per call; with one device this is the plain jitted method.
  """
  import inspect

  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  devices = list(jax.local_devices() if devices is None else devices)
  fn = pretrained.jitted(method)
  names = [n for n in inspect.signature(getattr(pretrained.model, method)).parameters]
  mesh = Mesh(np.asarray(devices), ("batch",))
  state = jax.device_put(pretrained.state, NamedSharding(mesh, PartitionSpec()))
  rows = NamedSharding(mesh, PartitionSpec("batch"))
  from clipvip_jax.models import layers  # here, not at the top: searching an exported model has no flax
  partition = layers.batch_partition(rows)  # a Pallas kernel (attention "pallas", "auto" on TPU) runs per device

  def encode(**batch):
    unknown = set(batch) - set(names)
    if unknown:
      raise TypeError(f"{method} takes {names}, not {sorted(unknown)}")
    args = []
    for name in names:
      value = batch.get(name)
      if value is not None and len(value) % len(devices):
        raise ValueError(f"a batch of {len(value)} rows does not split over {len(devices)} devices")
      args.append(None if value is None else jax.device_put(np.asarray(value), rows))
    with layers.kernel_partition(partition):  # read while `fn` is traced: XLA cannot split a kernel
      return fn(state, *args)

  encode.devices = devices  # type: ignore[attr-defined]
  return encode


def round_batch_size(batch_size: int, devices: int) -> int:
  """The smallest multiple of `devices` that is >= batch_size (every device gets the same number of rows)."""
  return -(-batch_size // devices) * devices
