"""Our side of the benchmarks: the trainer's own model init, optimiser and jitted train step, built as
clipvip_jax.train.trainer builds them (model_init.init_model -> optim.make_optimizer -> step.make_train_step with
explicit shardings and donated buffers), compiled ahead of time once, then called like the trainer calls it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from clipvip_jax.train import model_init, optim, sharding
from clipvip_jax.train import step as step_lib

# CLIP-ViP's fine-tuning optimiser (AdamW, b2 0.98, eps 1e-6, decay 0.2, clipping), the same on the peer.
OPTIM = dict(name="adamw", lr=1e-6, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
             schedule="warmup_cosine", warmup_fraction=0.1, lr_floor=1e-8)


def model_section(variant: str, *, kind: str = "clipvip", frames: int = 12, num_proxies: int = 4,
                  dtype: str = "float32", remat: str = "auto", attention: str = "xla",
                  attention_pattern: str = "block_sparse", clip_overrides: dict | None = None,
                  scan_layers: bool = False) -> dict[str, Any]:
  """config.model for model_init: a CLIP variant with CLIP-ViP's fields (temporal_size = the frame count)."""
  section = dict(kind=kind, variant=variant, dtype=dtype, remat=remat, attention=attention, scan_layers=scan_layers,
                 clip=dict(clip_overrides or {}), config={})
  if kind == "clipvip":
    section["config"] = dict(num_proxies=num_proxies, temporal_size=frames, attention_pattern=attention_pattern)
  return section


def synthetic_batch(batch: int, frames: int, image_size: int, text_len: int, vocab_size: int,
                    seed: int = 0, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """A batch shaped like the Grain pipeline's: CLIP-normalised-looking video, full frame masks, token ids ending
  in the end-of-text token (the highest id, where both models pool) followed by padding."""
  rng = np.random.default_rng(seed)
  video = rng.standard_normal((batch, frames, image_size, image_size, 3), dtype=np.float32).astype(dtype)
  lengths = rng.integers(max(2, text_len // 2), text_len + 1, size=batch)
  ids = rng.integers(1, vocab_size - 2, size=(batch, text_len))
  pos = np.arange(text_len)[None]
  ids = np.where(pos < lengths[:, None] - 1, ids, 0)
  ids[np.arange(batch), lengths - 1] = vocab_size - 1
  return {"video": video, "frame_mask": np.ones((batch, frames), np.int32), "text_ids": ids.astype(np.int32),
          "text_mask": (pos < lengths[:, None]).astype(np.int32)}


@dataclasses.dataclass
class OursStep:
  """Parameters, optimiser state and the compiled step; `step(batch)` runs one step and keeps the new state."""
  state: model_init.ModelState
  params: Any
  opt_state: Any
  compiled: Any
  batch_sharding: Any
  compile_seconds: float
  objective: step_lib.Objective

  def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.device_put(batch[k], self.batch_sharding) for k in self.objective.batch_keys}

  def step(self, device_batch: dict[str, jax.Array]) -> jax.Array:
    self.params, self.opt_state, metrics = self.compiled(self.params, self.opt_state, device_batch)
    return metrics["loss"]

  @property
  def cost_flops(self) -> float | None:
    """XLA's count for one call of the compiled (per-device) program."""
    from clipvip_jax.train.logging import compiled_flops  # pylint: disable=import-outside-toplevel
    return compiled_flops(self.compiled)

  @property
  def memory(self) -> Any:
    return self.compiled.memory_analysis()

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def build(model: dict[str, Any], example_batch: dict[str, np.ndarray], *, mode: str = "nce", seed: int = 0,
          mesh_shape: tuple[int, int, int] = (-1, 1, 1), rules=sharding.DEFAULT_RULES,
          optim_cfg: dict | None = None, devices=None, compiler_options: dict[str, Any] | None = None,
          constrain_activations: bool = False) -> OursStep:
  """The trainer's state and step for `model` (a config.model section), compiled for `example_batch`'s shapes.
  `compiler_options` are XLA debug options for this one compilation (e.g. {"xla_cpu_...": ...}), so variants can
  be compared in one process. `constrain_activations` as config.constrain_activations."""
  config = ml_collections.ConfigDict(dict(seed=seed, model=model, init=dict(checkpoint="")))
  mesh = sharding.make_mesh(mesh_shape, devices)
  ms = model_init.init_model(config, mesh, rules)
  tx, _, param_rules = optim.make_optimizer(ml_collections.ConfigDict(optim_cfg or OPTIM), ms.params, 1000)
  opt_shardings = step_lib.opt_state_shardings(jax.eval_shape(tx.init, ms.params), ms.params, ms.shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(ms.params)
  batch_sharding = sharding.batch_sharding(mesh, rules, 1)
  objective = step_lib.make_objective(mode)
  train_step = step_lib.make_train_step(ms.graphdef, ms.rest, objective, tx, param_rules,
                                        param_shardings=ms.shardings, opt_shardings=opt_shardings,
                                        batch_sharding=batch_sharding,
                                        constrain_activations=(sharding.activation_constraint(mesh, rules)
                                                               if constrain_activations else None))
  ours = OursStep(ms, ms.params, opt_state, None, batch_sharding, 0.0, objective)
  t0 = time.perf_counter()
  ours.compiled = train_step.fn.lower(ms.params, opt_state, ours.put(example_batch)).compile(
      compiler_options=compiler_options or None)
  ours.compile_seconds = time.perf_counter() - t0
  return ours
