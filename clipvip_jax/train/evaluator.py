"""Retrieval evaluation: encode every video and text of a split once, then R@1/5/10, MdR, MnR both ways, with and
without dual softmax, under the split's protocol. The Evaluator serves the trainer and the eval command (its
command line is train/cli.py's eval_main; this module imports no command, so there is no import circle):

  python -m clipvip_jax.eval --config configs/clipvip_msrvtt.py --checkpoint WORKDIR [--which best] \
      [--split test] [--output results.json] [--config.eval.batch_size=64 ...]

--checkpoint takes a training workdir (its latest, best or numbered checkpoint), a converted directory or an
original checkpoint file. Encoding uses fixed-shape batches (the last one padded), sharded over the mesh's batch
axes, one compiled program per input shape; every host encodes its own slice of the videos.

Protocol, from the split's texts (pipeline.EvalData.text_video_index): one text per video in video order is the
single-caption protocol (MSR-VTT 1k-A, LSMDC) or the paragraph protocol (DiDeMo and ActivityNet with
data.paragraph = True); several texts per video is the multi-caption protocol (MSVD, VATEX): every caption is a
t2v query and v2t scores each video against each caption set by its best caption (clipvip_jax.metrics).
Corrupt evaluation videos (no texts) are left out of the matrix.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipvip_jax import metrics
from clipvip_jax.models import layers
from clipvip_jax.train import step as step_lib


def protocol_of(text_video_index: np.ndarray, num_videos: int) -> str:
  if len(text_video_index) == num_videos and np.array_equal(text_video_index, np.arange(num_videos)):
    return "single"
  return "multi"


def encode_functions(graphdef: nnx.GraphDef, rest: Any, param_shardings: Any, batch_sharding: NamedSharding):
  """The evaluation's jitted programs (video encoder, text encoder, similarity), batches split by
  `batch_sharding` and results replicated: what the Evaluator runs, and what the planner compiles for a slice."""
  replicated = NamedSharding(batch_sharding.mesh, P())
  partition = layers.batch_partition(batch_sharding)  # Pallas kernels (attention="pallas") per device

  def model(params):
    return nnx.merge(graphdef, params, rest)

  def encode_video(params, video, frame_mask, clip_index, valid):
    video = step_lib.pixels(video, frame_mask)  # uint8 input (data.dtype "uint8") is normalised on device
    with layers.kernel_partition(partition):
      return model(params).encode_video(video, frame_mask).astype(jnp.float32), clip_index, valid

  def encode_text(params, ids, mask):
    with layers.kernel_partition(partition):
      return model(params).encode_text(ids, mask).astype(jnp.float32)

  def similarity(params, text, video):
    return model(params).similarity(text, video)

  bs = batch_sharding
  return (jax.jit(encode_video, in_shardings=(param_shardings, bs, bs, bs, bs), out_shardings=replicated),
          jax.jit(encode_text, in_shardings=(param_shardings, bs, bs), out_shardings=replicated),
          jax.jit(similarity, in_shardings=(param_shardings, replicated, replicated), out_shardings=replicated))


class Evaluator:
  """`evaluator(params) -> {"t2v/R@1": ..., "dsl_t2v/R@1": ..., "protocol": ...}` for one evaluation split."""

  def __init__(self, eval_data: Any, graphdef: nnx.GraphDef, rest: Any, param_shardings: Any, mesh, rules):
    from clipvip_jax.train import sharding
    self.data = eval_data
    self.batch_size = eval_data.config.batch_size
    self.batch_sharding = sharding.batch_sharding(mesh, rules, 1)
    batch_axes = self.batch_sharding.spec[0]
    n_batch_devices = math.prod(mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str)
                                                        else batch_axes or ()))
    if self.batch_size % n_batch_devices:
      raise ValueError(f"eval batch size {self.batch_size} is not divisible by the {n_batch_devices} devices of "
                       "the mesh's batch axes")

    self._video, self._text, self._sim = encode_functions(graphdef, rest, param_shardings, self.batch_sharding)

  def _global(self, host_array: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(host_array))

  def _same_on_all_hosts(self, array: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(array.shape, self.batch_sharding, lambda index: array[index])

  def encode_videos(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N_video, D], valid [N_video] bool) in video order."""
    out, valid = None, np.zeros(self.data.num_videos, bool)
    for batch in self.data.video_batches():
      emb, index, ok = self._video(params, *(self._global(batch[k]) for k in ("video", "frame_mask", "clip_index",
                                                                             "valid")))
      emb, index, ok = np.asarray(emb), np.asarray(index), np.asarray(ok).astype(bool)
      if out is None:
        out = np.zeros((self.data.num_videos, emb.shape[-1]), np.float32)
      keep = (index >= 0) & ok
      out[index[keep]] = emb[keep]
      valid[index[keep]] = True
    return out, valid

  def encode_texts(self, params: Any) -> np.ndarray:
    ids, mask = self.data.text_ids, self.data.text_mask
    n, b = len(ids), self.batch_size
    pieces = []
    for start in range(0, n, b):
      part_ids, part_mask = ids[start:start + b], mask[start:start + b]
      real = len(part_ids)
      if real < b:  # pad by repeating the last row: one compiled shape, no empty text
        part_ids = np.concatenate([part_ids, np.repeat(part_ids[-1:], b - real, 0)])
        part_mask = np.concatenate([part_mask, np.repeat(part_mask[-1:], b - real, 0)])
      emb = self._text(params, self._same_on_all_hosts(part_ids), self._same_on_all_hosts(part_mask))
      pieces.append(np.asarray(emb)[:real])
    return np.concatenate(pieces)

  def similarity(self, params: Any, text: np.ndarray, video: np.ndarray, block: int = 4096) -> np.ndarray:
    rows = []
    for start in range(0, len(text), block):
      rows.append(np.asarray(self._sim(params, jnp.asarray(text[start:start + block]), jnp.asarray(video))))
    return np.concatenate(rows)

  def __call__(self, params: Any) -> dict[str, Any]:
    start = time.time()
    video, valid = self.encode_videos(params)
    text = self.encode_texts(params)
    # Corrupt videos have no texts: drop their columns and renumber the texts' video indices.
    kept = np.flatnonzero(valid)
    new_index = -np.ones(len(valid), np.int64)
    new_index[kept] = np.arange(len(kept))
    labels = new_index[self.data.text_video_index]
    if (labels < 0).any():
      raise ValueError(f"{int((labels < 0).sum())} evaluation texts belong to videos that could not be encoded")
    sim = self.similarity(params, text, video[kept])
    protocol = protocol_of(labels, len(kept))
    result: dict[str, Any] = metrics.with_dual_softmax(sim, None if protocol == "single" else labels)
    result.update({"protocol": protocol, "num_texts": int(len(text)), "num_videos": int(len(kept)),
                   "seconds": round(time.time() - start, 2)})
    return result


def scalar_metrics(result: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in result.items() if k not in ("protocol",) and isinstance(v, (int, float))}


def format_table(result: Mapping[str, Any]) -> str:
  lines = [f"{'':8s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'MdR':>6s} {'MnR':>7s}"]
  for prefix, name in (("", ""), ("dsl_", "+DSL ")):
    for direction in ("t2v", "v2t"):
      key = f"{prefix}{direction}"
      if f"{key}/R@1" not in result:
        continue
      v = [result[f"{key}/{m}"] for m in ("R@1", "R@5", "R@10", "MdR", "MnR")]
      lines.append(f"{name + direction:8s} {v[0]:6.1f} {v[1]:6.1f} {v[2]:6.1f} {v[3]:6.1f} {v[4]:7.1f}")
  return "\n".join(lines)


def dump(result: Mapping[str, Any], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(result), f, indent=2, sort_keys=True)
    f.write("\n")
