"""The training objectives of each mode and the one jitted, pure train step.

An objective has two halves, so that gradient accumulation can keep every negative of the global batch:
  features(model, batch) -> {name: [b, ...]}   per-example embeddings; row i depends on example i only
  loss(model, features, valid) -> (scalar, parts)   the contrastive loss over the whole (global) batch
`valid` ([B], from the input pipeline) marks rows whose record was corrupt: they stay in the batch (so no other
row moves) but are neither positives nor negatives (losses.mask_columns); None when the batch has no "valid".
Modes:
  "nce"         CLIP-ViP fine-tuning (and meanP): L_{V<->T} = CE(V T^T) + CE(T V^T), logits e^s * cosine.
  "omnisource"  CLIP-ViP pretraining: one of losses.OMNISOURCE_LOSSES over video, subtitle, caption and the
                middle frame encoded as a 1-frame video.
  "clip2video"  w * L_global + (1 - w) * L_TAB (the model's own logits and loss).

Gradient accumulation (grad_accum = k > 1) splits the batch into k micro-batches WITHOUT shrinking the set of
negatives: (1) the features of every micro-batch are computed without gradients, (2) the loss and its gradient
with respect to the features are computed once on the full batch, (3) each micro-batch is run again under
jax.vjp with its slice of that feature gradient, and the parameter gradients are summed. The result equals one
step on the whole batch (float32 rounding aside) at the activation memory of one micro-batch, for one extra
forward pass. Plain accumulation of per-micro-batch contrastive losses would instead train with B/k negatives.

The step is a pure function of (params, opt_state, batch) built from a graphdef split once; it is jitted with
explicit in/out shardings and donated parameter and optimiser buffers. A non-finite loss or gradient norm keeps
params and opt_state unchanged and is reported through metrics["finite"]: the optimiser update runs under
jax.lax.cond, so a skipped step does no update work and a normal one makes no extra select pass over the
parameters and both Adam moments (jnp.where on every leaf kept old and new copies of all three alive at once).
With `constrain_activations` (a function of an activation, sharding.activation_constraint), every transformer
block pins its residual stream to it while the step is traced (layers.activation_constraint); with
`gather_weights` (sharding.weight_gather, under FSDP) every projection gathers its kernel where it is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipvip_jax import losses
from clipvip_jax.models import layers
from clipvip_jax.train import optim
from data_pipelines import transforms

Array = jax.Array
Batch = Mapping[str, Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  batch_keys: tuple[str, ...]
  features: Callable[[nnx.Module, Batch], dict[str, Array]]
  loss: Callable[[nnx.Module, Mapping[str, Array], Array | None], tuple[Array, dict[str, Array]]]


def pixels(x: Array, frame_mask: Array | None = None) -> Array:
  """Frames as the model takes them. uint8 frames (data.dtype "uint8": one byte a pixel through the input
  workers and the host-to-device copy, a quarter of float32's) are CLIP-normalised here, on the device, with
  padded frames zeroed as the host pipeline does; float frames arrive normalised and pass through."""
  return transforms.normalize_video(x, frame_mask, xp=jnp) if x.dtype == jnp.uint8 else x


def _nce_features(model, batch):
  return {"video": model.encode_video(pixels(batch["video"], batch["frame_mask"]), batch["frame_mask"]),
          "text": model.encode_text(batch["text_ids"], batch["text_mask"])}


def _nce_loss(model, f, valid=None):
  return losses.nce_loss(f["video"], f["text"], model.logit_scale[...], valid), {}


def _omnisource_features(model, batch):
  return {"video": model.encode_video(pixels(batch["video"], batch["frame_mask"]), batch["frame_mask"]),
          "subtitle": model.encode_text(batch["subtitle_ids"], batch["subtitle_mask"]),
          "caption": model.encode_text(batch["caption_ids"], batch["caption_mask"]),
          "frame": model.encode_image(pixels(batch["image"]))}


def _clip2video_features(model, batch):
  text = model.text_features(batch["text_ids"], batch["text_mask"])
  video = model.video_features(pixels(batch["video"], batch["frame_mask"]), batch["frame_mask"])
  keep = ("text_global", "tab_text", "video_global", "tab_video")
  return {k: v for k, v in {**text, **video}.items() if k in keep}


def _clip2video_loss(model, f, valid=None):
  text = {k: f[k] for k in ("text_global", "tab_text") if k in f}
  video = {k: f[k] for k in ("video_global", "tab_video") if k in f}
  return model.loss(model.logits(text, video), valid)


VIDEO_TEXT_KEYS = ("video", "frame_mask", "text_ids", "text_mask")
OPTIONAL_KEYS = ("valid",)  # used when the batch has it (the input pipeline's corrupt-row mask)
MODES = ("nce", "omnisource", "clip2video")


def make_objective(mode: str, loss_name: str | None = None) -> Objective:
  """The objective of a training mode; `loss_name` picks the omnisource loss (an original class name)."""
  if mode == "nce":
    return Objective("nce", VIDEO_TEXT_KEYS, _nce_features, _nce_loss)
  if mode == "omnisource":
    fn = losses.get_omnisource_loss(loss_name or "NCELearnableTempLoss_vsc_fc")

    def loss(model, f, valid=None):
      return fn(f["video"], f["subtitle"], f["frame"], f["caption"], model.logit_scale[...], valid), {}

    keys = ("video", "frame_mask", "subtitle_ids", "subtitle_mask", "caption_ids", "caption_mask", "image")
    return Objective(f"omnisource:{loss_name}", keys, _omnisource_features, loss)
  if mode == "clip2video":
    return Objective("clip2video", VIDEO_TEXT_KEYS, _clip2video_features, _clip2video_loss)
  raise ValueError(f"unknown training mode {mode!r}; known: {MODES}")


def is_logit_scale(name: str) -> bool:
  return name == "logit_scale" or name.endswith("/logit_scale")


def logit_scale_of(params: Any) -> Array:
  leaves = [x for path, x in jax.tree_util.tree_flatten_with_path(params)[0] if is_logit_scale(optim.path_name(path))]
  return leaves[0] if leaves else jnp.zeros(())


def _micro_batches(x: Array, k: int, spec: P | None) -> Array:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...: each device's contiguous block of
  the batch contributes equally to every micro-batch, so micro-batches stay spread over the whole mesh."""
  y = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  if spec is not None:
    y = jax.lax.with_sharding_constraint(y, spec)
  return y


def _whole_batch(x: Array) -> Array:
  """The inverse of _micro_batches: [k, B/k, ...] -> [B, ...] in the original row order."""
  y = jnp.swapaxes(x, 0, 1)
  return y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])


def skip_unless(finite: Array, update: Callable, keep: Callable, operands: Any) -> Any:
  """update(operands) when `finite`, else keep(operands); only the branch taken runs (jax.lax.cond)."""
  return jax.lax.cond(finite, update, keep, operands)


@dataclasses.dataclass
class TrainStep:
  """`fn(params, opt_state, batch) -> (params, opt_state, metrics)`, jitted; and what built it."""
  fn: Callable[..., Any]
  objective: Objective
  grad_accum: int

  def __call__(self, params, opt_state, batch):
    return self.fn(params, opt_state, {k: batch[k] for k in self.objective.batch_keys + OPTIONAL_KEYS if k in batch})


def make_train_step(graphdef: nnx.GraphDef, rest: Any, objective: Objective, tx: optax.GradientTransformation,
                    rules: Any, *, grad_accum: int = 1, param_shardings: Any = None, opt_shardings: Any = None,
                    batch_sharding: NamedSharding | None = None,
                    constrain_activations: Callable[[Array], Array] | None = None,
                    gather_weights: Callable[[Array, Any], Array] | None = None) -> TrainStep:
  """The jitted step. `rules` (optim.param_rules) marks frozen parameters: their gradients are never computed
  (stop_gradient), so XLA prunes that part of the backward pass."""
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
  frozen = optim.frozen_mask(rules)
  micro_spec = gathered = row_sharded = None
  if batch_sharding is not None:
    micro_spec = NamedSharding(batch_sharding.mesh, P(None, *batch_sharding.spec))
    gathered = NamedSharding(batch_sharding.mesh, P())
    row_sharded = NamedSharding(batch_sharding.mesh, P(batch_sharding.spec[0], None))

  def stop_frozen(params):
    return jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, params, frozen)

  def features_fn(params, batch):
    return objective.features(nnx.merge(graphdef, stop_frozen(params), rest), batch)

  def loss_fn(params, features, valid):
    if gathered is not None:
      # The loss sees the whole global batch: gather each feature matrix once, here, for every term that uses it.
      # Left to the partitioner, CLIP2Video's loss re-gathered the same [B, D] matrix for each use (138 all-gathers
      # of f32[128,512] in its MSR-VTT step on 8 chips: docs/performance.md section 4).
      features = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, gathered), features)
      valid = None if valid is None else jax.lax.with_sharding_constraint(valid, gathered)
    rows = None if row_sharded is None else (lambda x: jax.lax.with_sharding_constraint(x, row_sharded))
    with losses.logits_constraint(rows):  # each device its own rows of every B x B logits matrix
      return objective.loss(nnx.merge(graphdef, stop_frozen(params), rest), features, valid)

  def gradients(params, batch):
    batch = dict(batch)
    valid = batch.pop("valid", None)
    if grad_accum == 1:
      def total(p):
        return loss_fn(p, features_fn(p, batch), valid)
      (loss, parts), grads = jax.value_and_grad(total, has_aux=True)(params)
      return loss, parts, grads
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if any(n % grad_accum for n in sizes.values()):
      raise ValueError(f"batch sizes {sizes} are not divisible by grad_accum {grad_accum}")
    micro = {k: _micro_batches(v, grad_accum, None if micro_spec is None or v.ndim < 1 else micro_spec)
             for k, v in batch.items()}
    stacked = jax.lax.map(lambda mb: features_fn(params, mb), micro)  # pass 1: features, no gradients
    features = jax.tree.map(_whole_batch, stacked)
    (loss, parts), (direct, feature_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, features, valid)  # the loss on the whole batch; `direct` holds d loss / d logit_scale
    feature_grads = jax.tree.map(lambda g: _micro_batches(g, grad_accum, None), feature_grads)

    def accumulate(acc, inputs):  # pass 2: back-propagate each micro-batch's share of the feature gradient
      mb, g_features = inputs
      _, vjp = jax.vjp(lambda p: features_fn(p, mb), params)
      (g,) = vjp(g_features)
      return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(accumulate, direct, (micro, feature_grads))
    return loss, parts, grads

  def update(operands):
    params, opt_state, grads = operands
    # The clamps of `rules` (optim.clamp / clamp_when): CLIP-ViP clamps logit_scale after the forward and updates
    # the clamped value with the unclamped value's gradient; CLIP4Clip clamps after the update.
    params = optim.clamp_params(params, rules, "before_update")
    updates, new_opt_state = tx.update(grads, opt_state, params)
    return optim.clamp_params(optim.apply_updates(params, updates), rules, "after_update"), new_opt_state

  def keep(operands):
    params, opt_state, _ = operands
    return params, opt_state

  partition = layers.batch_partition(batch_sharding)

  def step(params, opt_state, batch):
    with layers.activation_constraint(constrain_activations), layers.weight_gather(gather_weights), \
        layers.kernel_partition(partition):  # None: none
      loss, parts, grads = gradients(params, batch)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing: parameters and optimiser state (moments, count) are kept as they were.
    new_params, new_opt_state = skip_unless(finite, update, keep, (params, opt_state, grads))
    metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm.astype(jnp.float32), "finite": finite,
               "logit_scale": logit_scale_of(new_params).astype(jnp.float32),
               **{k: v.astype(jnp.float32) for k, v in parts.items()}}
    if "valid" in batch:  # corrupt records of the global batch, masked out of the loss (counted on the device)
      metrics["masked_rows"] = (batch["valid"].shape[0] - jnp.sum(batch["valid"])).astype(jnp.float32)
    return new_params, new_opt_state, metrics

  if param_shardings is None:
    fn = jax.jit(step, donate_argnums=(0, 1))
  else:
    replicated = NamedSharding(batch_sharding.mesh, P())
    fn = jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_sharding),
                 out_shardings=(param_shardings, opt_shardings, replicated), donate_argnums=(0, 1))
  return TrainStep(fn=fn, objective=objective, grad_accum=grad_accum)


def batch_spec(config_data: Any, objective: Objective, batch_sharding: NamedSharding) -> dict[str, Any]:
  """The step's batch as sharded ShapeDtypeStructs: the keys the objective reads (and `valid`) of the input
  pipeline's global training batch (pipeline.batch_spec), split as the trainer places it."""
  from data_pipelines import pipeline
  spec = pipeline.batch_spec(config_data)
  out = {}
  for key in objective.batch_keys + OPTIONAL_KEYS:
    shape, dtype = spec[key]
    sharding = NamedSharding(batch_sharding.mesh, P(batch_sharding.spec[0], *([None] * (len(shape) - 1))))
    out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return out


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh) -> Any:
  """Shardings for an optimiser state: a leaf whose path ends with a parameter's path (mu/nu mirror the params)
  and has its shape takes that parameter's sharding; everything else (counts) is replicated."""
  by_name = {}
  for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(param_shardings)[0], jax.tree.leaves(params)):
    by_name[optim.path_name(path)] = (sh, tuple(jnp.shape(leaf)))
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    for i in range(len(path)):
      hit = by_name.get(optim.path_name(path[i:]))
      if hit is not None and hit[1] == tuple(jnp.shape(leaf)):
        return hit[0]
    return replicated

  return jax.tree_util.tree_map_with_path(one, opt_state)
