"""Contrastive losses of CLIP-ViP and CLIP2Video, as pure jit-able functions of global-batch features.

Every CLIP-ViP loss takes already L2-normalised features and the raw `logit_scale` parameter (the logits are
exp(logit_scale) * cosine). Each cross entropy is the mean over its rows; terms are summed, not averaged,
as in the original `NCELearnableTemp*` losses (their trailing `.mean()` acts on a scalar).

Sharding: the functions see the *global* batch, so every sample is a negative for every other sample on
any device. Two ways to run them on a batch split over a mesh axis, both tested against one device for
the loss and the gradients:
- `jit` with the features as global arrays sharded `NamedSharding(mesh, P('data'))`: call the loss as is;
  the partitioner inserts the all-gather (on `AxisType.Explicit` meshes the loss reshards the features to
  replicated itself, since a [B@data] x [B@data]^T product is a sharding type error). This is what the
  trainer should use: it is the same code as on one device, it composes with whatever sharding the
  encoders use (data, fsdp, tensor), and the loss is a B x B matmul that costs nothing next to the encoders.
- `shard_map_loss(loss_fn, mesh)`: an explicit `all_gather` of the features inside `shard_map`, then the
  whole loss on every device (what the original does after `hvd.allgather`). Use it inside a step that is
  itself written per device, or to pin the communication to exactly one all-gather per feature.

Numerics: features are cast to (at least) float32 and the matmuls use full precision before `log_softmax`, so
bf16 activations round neither the logits (|logit| reaches 100) nor the log-sum-exp.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Array = jax.Array
OmnisourceLoss = Callable[[Array, Array, Array, Array, Array], Array]


def _replicated(x: Array) -> Array:
  """`x` gathered onto every device when it carries an explicit (sharding-in-types) batch sharding.

  Under `AxisType.Explicit` a [B@data] x [B@data]^T matmul is a type error; the loss needs the whole batch
  anyway, so it is gathered here (the all-gather the original does with `hvd.allgather`). Arrays without
  explicit sharding (one device, `AxisType.Auto` meshes, inside `shard_map`) are returned unchanged.
  """
  sharding = jax.typeof(x).sharding
  if all(axis is None for axis in sharding.spec):
    return x
  return jax.sharding.reshard(x, NamedSharding(sharding.mesh, P()))


_LOGITS_CONSTRAINT: contextvars.ContextVar[Callable[[Array], Array] | None] = contextvars.ContextVar(
    "logits_constraint", default=None)  # the same mechanism as layers.activation_constraint


@contextlib.contextmanager
def logits_constraint(constrain: Callable[[Array], Array] | None) -> Iterator[None]:
  """While active, every [B, B] logits matrix passes through `constrain` when it is made. The trainer gives its
  rows the batch's sharding: each device computes its own rows against the gathered columns, and the column-wise
  cross entropies reduce [B] partial sums across devices. Left replicated, every device would compute the whole
  B x B matrix of every term (at 1,024 chips and batch 16,384, ~2.5 TFLOP and ~14 GiB per chip per step:
  docs/performance.md section 4)."""
  token = _LOGITS_CONSTRAINT.set(constrain)
  try:
    yield
  finally:
    _LOGITS_CONSTRAINT.reset(token)


def _at_least_float32(x: Array) -> Array:
  """bf16/fp16 -> float32; float32 and float64 (x64 gradient checks) stay as they are."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _scaled_cosine(queries: Array, keys: Array, logit_scale: Array) -> Array:
  """exp(logit_scale) * queries @ keys^T in at least float32 (features are already L2-normalised)."""
  queries, keys = _replicated(queries), _replicated(keys)
  cosine = jnp.matmul(_at_least_float32(queries), _at_least_float32(keys).T,
                      precision=jax.lax.Precision.HIGHEST)
  constrain = _LOGITS_CONSTRAINT.get()
  if constrain is not None:
    cosine = constrain(cosine)
  return jnp.exp(_at_least_float32(logit_scale)) * cosine


def _cross_entropy(logits: Array, labels: Array, valid: Array | None = None) -> Array:
  """Mean over rows of -log softmax(logits)[row, label] (torch `F.cross_entropy`), in at least float32.

  valid: [B] row mask (see `mask_columns`): the mean runs over the valid rows only. None: every row counts,
  with the original's arithmetic unchanged.
  """
  log_probs = jax.nn.log_softmax(_at_least_float32(logits), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  if valid is None:
    return jnp.mean(nll)
  valid = _replicated(jnp.asarray(valid)).astype(bool)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(nll.dtype)


def mask_columns(logits: Array, valid: Array | None, repeats: int = 1) -> Array:
  """Columns of invalid samples (corrupt records kept in their rows, valid 0) can be no one's negative: their
  logits become the lowest finite value (not -inf: a row with every column masked stays finite, and so do the
  gradients). `repeats`: the columns are `repeats` blocks of the batch ([V S^T | V C^T])."""
  if valid is None:
    return logits
  keep = jnp.tile(_replicated(jnp.asarray(valid)).astype(bool), repeats)
  logits = _at_least_float32(logits)
  return jnp.where(keep[None, :], logits, jnp.finfo(logits.dtype).min)


def _diagonal_cross_entropy(logits: Array, valid: Array | None = None) -> Array:
  """Cross entropy with row i's positive at column i (paired batches); invalid rows and columns left out."""
  return _cross_entropy(mask_columns(logits, valid), jnp.arange(logits.shape[0]), valid)


def nce_loss(video: Array, text: Array, logit_scale: Array, valid: Array | None = None) -> Array:
  """L_{V<->T} = CE(V T^T, diag) + CE(T V^T, diag): CLIP-ViP fine-tuning (`NCELearnableTempLoss`).

  Args:
    video, text: [B, D] L2-normalised features of the global batch, pair i = (video[i], text[i]).
    logit_scale: the raw temperature parameter; the logits use its exp.
    valid: optional [B] mask of real samples: a corrupt record's row is neither a positive nor a negative.
  """
  logits = _scaled_cosine(video, text, logit_scale)
  return _diagonal_cross_entropy(logits, valid) + _diagonal_cross_entropy(logits.T, valid)


def _video_to_text_one_positive(video_subtitle: Array, video_caption: Array, positive: str,
                                valid: Array | None = None) -> Array:
  """Video->text CE over the 2B-1 texts {s_i or c_i} U {s_j, c_j : j != i}.

  The original builds each row as [positive | v_i.s_j (j != i) | v_i.c_j (j != i)] with label 0; cross
  entropy does not depend on column order, so here row i is [V S^T | V C^T] with the *other* own text
  (c_i when the subtitle is the positive, s_i when the caption is) masked out and the label on the positive.
  """
  batch = video_subtitle.shape[0]
  logits = jnp.concatenate([video_subtitle, video_caption], axis=1)  # [B, 2B]
  rows = jnp.arange(batch)
  if positive == "subtitle":
    labels, excluded = rows, rows + batch
  elif positive == "caption":
    labels, excluded = rows + batch, rows
  else:
    raise ValueError(f"positive must be 'subtitle' or 'caption', got {positive!r}")
  is_excluded = jnp.arange(2 * batch)[None, :] == excluded[:, None]
  return _cross_entropy(mask_columns(jnp.where(is_excluded, -jnp.inf, logits), valid, repeats=2), labels, valid)


def video_vs_subtitle_and_caption_loss(video: Array, subtitle: Array, frame: Array, caption: Array,
                                       logit_scale: Array, valid: Array | None = None) -> Array:
  """L_{V<->S,C}: subtitle and caption are both positives of the video (`NCELearnableTempLoss_vsc`).

  Four terms: CE(S V^T, diag) + CE(C V^T, diag) + video->text with the subtitle positive + video->text with
  the caption positive (each over 2B-1 texts: the own other text is neither positive nor negative).
  `frame` is unused; it is accepted so that every omnisource loss has one signature.
  """
  del frame
  if subtitle.shape[0] != caption.shape[0]:
    raise ValueError(f"subtitle and caption batches differ: {subtitle.shape[0]} vs {caption.shape[0]}")
  video_subtitle = _scaled_cosine(video, subtitle, logit_scale)
  video_caption = _scaled_cosine(video, caption, logit_scale)
  return (_diagonal_cross_entropy(video_subtitle.T, valid) + _diagonal_cross_entropy(video_caption.T, valid)
          + _video_to_text_one_positive(video_subtitle, video_caption, "subtitle", valid)
          + _video_to_text_one_positive(video_subtitle, video_caption, "caption", valid))


def omnisource_loss(video: Array, subtitle: Array, frame: Array, caption: Array,
                    logit_scale: Array, valid: Array | None = None) -> Array:
  """L_{V<->S,C} + L_{F<->C}: the shipped CLIP-ViP pretraining loss (`NCELearnableTempLoss_vsc_fc`), six terms.

  The middle frame F is encoded as a 1-frame video and contrasted with the auxiliary caption C.
  """
  return (video_vs_subtitle_and_caption_loss(video, subtitle, frame, caption, logit_scale, valid)
          + nce_loss(frame, caption, logit_scale, valid))


def video_subtitle_and_video_caption_loss(video: Array, subtitle: Array, frame: Array, caption: Array,
                                          logit_scale: Array, valid: Array | None = None) -> Array:
  """Ablation L_{V<->S} + L_{V<->C}: two separate NCE losses (`NCELearnableTempLoss_vs_vc`)."""
  del frame
  return nce_loss(video, subtitle, logit_scale, valid) + nce_loss(video, caption, logit_scale, valid)


def video_subtitle_video_caption_frame_caption_loss(video: Array, subtitle: Array, frame: Array,
                                                    caption: Array, logit_scale: Array,
                                                    valid: Array | None = None) -> Array:
  """Ablation L_{V<->S} + L_{V<->C} + L_{F<->C} (`NCELearnableTempLoss_vs_vc_fc`)."""
  return (nce_loss(video, subtitle, logit_scale, valid) + nce_loss(video, caption, logit_scale, valid)
          + nce_loss(frame, caption, logit_scale, valid))


def video_subtitle_frame_caption_loss(video: Array, subtitle: Array, frame: Array, caption: Array,
                                      logit_scale: Array, valid: Array | None = None) -> Array:
  """Ablation L_{V<->S} + L_{F<->C}: videos and images in separate losses (`VidImgDivideNCELearnableTempLoss`)."""
  return nce_loss(video, subtitle, logit_scale, valid) + nce_loss(frame, caption, logit_scale, valid)


# Keyed by the original class names, so a CLIP-ViP `loss_name` selects the same loss here.
OMNISOURCE_LOSSES: dict[str, OmnisourceLoss] = {
    "NCELearnableTempLoss_vsc_fc": omnisource_loss,
    "NCELearnableTempLoss_vsc": video_vs_subtitle_and_caption_loss,
    "NCELearnableTempLoss_vs_vc": video_subtitle_and_video_caption_loss,
    "NCELearnableTempLoss_vs_vc_fc": video_subtitle_video_caption_frame_caption_loss,
    "VidImgDivideNCELearnableTempLoss": video_subtitle_frame_caption_loss,
}

# The paper's (Fig. 2) name of each registered loss.
OMNISOURCE_LOSS_FORMULAS: dict[str, str] = {
    "NCELearnableTempLoss_vsc_fc": "L_{V<->S,C} + L_{F<->C}",
    "NCELearnableTempLoss_vsc": "L_{V<->S,C}",
    "NCELearnableTempLoss_vs_vc": "L_{V<->S} + L_{V<->C}",
    "NCELearnableTempLoss_vs_vc_fc": "L_{V<->S} + L_{V<->C} + L_{F<->C}",
    "VidImgDivideNCELearnableTempLoss": "L_{V<->S} + L_{F<->C}",
}


def get_omnisource_loss(name: str) -> OmnisourceLoss:
  """The omnisource loss registered under `name` (an original CLIP-ViP loss class name)."""
  if name not in OMNISOURCE_LOSSES:
    raise KeyError(f"unknown omnisource loss {name!r}; known: {sorted(OMNISOURCE_LOSSES)}")
  return OMNISOURCE_LOSSES[name]


def dual_softmax(sim: Array, temperature: float = 100.0) -> Array:
  """Dual-softmax (DSL) re-scoring at inference: sim * softmax(temperature * sim) over texts (axis 0).

  Args:
    sim: [N_text, N_video] raw cosine similarities (no logit scale), as CLIP-ViP evaluates.
    temperature: fixed at 100 in CLIP-ViP.
  """
  sim = _at_least_float32(_replicated(sim))
  return sim * jax.nn.softmax(temperature * sim, axis=0)


def symmetric_ce(logits: Array, valid: Array | None = None) -> Array:
  """(CE(S, diag) + CE(S^T, diag)) / 2 on already-scaled logits: CLIP4Clip's `CrossEn` on both directions."""
  logits = _replicated(logits)
  return 0.5 * (_diagonal_cross_entropy(logits, valid) + _diagonal_cross_entropy(logits.T, valid))


def clip2video_loss(global_logits: Array, tab_logits: Array, center_weight: float = 0.5,
                    valid: Array | None = None) -> Array:
  """CLIP2Video training loss w * L_global + (1 - w) * L_TAB, each a `symmetric_ce`.

  Args:
    global_logits: [B, B] TDB similarity, text rows, already times exp(logit_scale).
    tab_logits: [B, B] TAB similarity, same layout and scale.
    center_weight: w (0.5 in CLIP2Video), the same weight the inference score uses.
  """
  return (center_weight * symmetric_ce(global_logits, valid)
          + (1.0 - center_weight) * symmetric_ce(tab_logits, valid))


def shard_map_loss(loss_fn: Callable[..., Array], mesh: Mesh, axis_name: str = "data") -> Callable[..., Array]:
  """Wraps `loss_fn(*features, logit_scale)` to take per-device feature shards and gather them explicitly.

  Each feature argument is sharded on its batch axis over `axis_name`; `logit_scale` is replicated. Inside,
  every feature is all-gathered (device-invariant result) and the whole loss is computed on every device,
  so the negatives are the global batch and the output is the replicated global loss. The transpose of the
  invariant all-gather hands each device the gradient of its own rows only, so gradients are exact (no
  factor of the device count).
  """

  def per_device(*args: Array) -> Array:
    *features, logit_scale = args
    gathered = [jax.lax.all_gather(f, axis_name, axis=0, tiled=True, to="invarying") for f in features]
    return loss_fn(*gathered, logit_scale)

  def wrapped(*args: Array) -> Array:
    if len(args) < 2:
      raise ValueError("shard_map_loss expects feature arrays followed by logit_scale")
    in_specs = tuple(P(axis_name) for _ in args[:-1]) + (P(),)
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P())(*args)

  return wrapped
