"""Training checkpoints: Orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Each step directory holds five items, saved together and asynchronously (the device->host copy blocks, the
writes run in the background while training continues):
  params     the parameter pytree (float32, sharded arrays; restored onto any mesh with target shardings)
  opt_state  the optimiser state (moments and update count; frozen parameters have none)
  data       {"state": the Grain iterator state (JSON text)}: resuming reads exactly the batches that follow
  meta       {"step", "kind", "model" (the model config dict), "nonfinite_total", "nonfinite_steps"}
  config     the run config (JSON)
Retention: the latest `keep` checkpoints, plus the best one by a validation metric (saved with the metrics of an
evaluation at that step), via Orbax preservation policies. WORKDIR/best.json names the best step and its value.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_FILE = "best.json"
ITEMS = ("params", "opt_state", "data", "meta", "config")


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Save/restore of the training state in WORKDIR/checkpoints, with latest-N and best-by-metric retention."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    self.workdir = pathlib.Path(workdir).absolute()
    self.best_metric, self.best_mode = best_metric, best_mode
    preserve: list[Any] = [policies.LatestN(n=keep)]
    if best_metric:
      preserve.append(policies.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=best_mode == "min",
                                     n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save,
                                           preservation_policy=policies.AnyPreservationPolicy(preserve),
                                           create=True)
    self.manager = ocp.CheckpointManager(self.workdir / CHECKPOINT_DIR, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, data_state: Any, meta: Mapping[str, Any],
           config: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> bool:
    """Starts an asynchronous save of `step` (a no-op if that step is already saved)."""
    if step in self.manager.all_steps():
      return False
    if isinstance(data_state, bytes):
      data_state = data_state.decode()
    metrics = None if not metrics or self.best_metric not in metrics else {
        k: float(v) for k, v in metrics.items()}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave({"state": data_state}), meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        config=ocp.args.JsonSave(dict(config)))
    saved = self.manager.save(step, args=args, metrics=metrics, force=True)
    if metrics is not None and jax.process_index() == 0:
      self._update_best(step, metrics[self.best_metric])
    return saved

  def _update_best(self, step: int, value: float) -> None:
    path = self.workdir / BEST_FILE
    best = json.loads(path.read_text()) if path.exists() else None
    # Ties go to the later step, as Orbax's BestN does (a stable sort keeping the last n): best.json must name the
    # checkpoint that the preservation policy actually keeps.
    better = best is None or (value >= best["value"] if self.best_mode == "max" else value <= best["value"])
    if better:
      tmp = path.with_suffix(".json.tmp")
      tmp.write_text(json.dumps({"step": int(step), "metric": self.best_metric, "value": float(value)}) + "\n")
      os.replace(tmp, path)

  def restore(self, step: int, params: Any, param_shardings: Any, opt_state: Any,
              opt_shardings: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(params, opt_state, data state or None, meta) of `step`, laid out with the given (target) shardings, so a
    checkpoint written on one mesh restores onto any other. `params`/`opt_state` give shapes and dtypes only."""
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params, param_shardings)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state, opt_shardings)),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored.params, restored.opt_state, restored.data.get("state"), dict(restored.meta)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def is_workdir(path: str | pathlib.Path) -> bool:
  """A training workdir of this project (has checkpoints/ with at least one step)."""
  root = pathlib.Path(path)
  return (root / CHECKPOINT_DIR).is_dir() and any(p.name.isdigit() for p in (root / CHECKPOINT_DIR).iterdir())


def _step_dir(path: pathlib.Path, step: int | None) -> pathlib.Path:
  root = path / CHECKPOINT_DIR
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "params").is_dir())
  if not steps:
    raise FileNotFoundError(f"{root} holds no finished checkpoint")
  if step is None:
    return root / str(steps[-1])
  if step not in steps:
    raise FileNotFoundError(f"{root} has no checkpoint of step {step}; it has {steps}")
  return root / str(step)


def resolve_step(path: str | pathlib.Path, which: str | int | None = None) -> pathlib.Path:
  """The step directory of a workdir: `which` = None/"latest", "best" (best.json) or a step number.

  Absolute, because Orbax reads no item metadata through a relative path.
  """
  root = pathlib.Path(path).absolute()
  if which == "best":
    best = root / BEST_FILE
    if not best.exists():
      raise FileNotFoundError(f"{root} has no {BEST_FILE} (no evaluation with checkpoint.best_metric ran)")
    return _step_dir(root, int(json.loads(best.read_text())["step"]))
  return _step_dir(root, None if which in (None, "latest") else int(which))


def load_workdir_params(path: str | pathlib.Path, which: str | int | None = None
                        ) -> tuple[str, Any, dict[str, np.ndarray]]:
  """(kind, model config object, flat float32 numpy params) of a workdir checkpoint, restored on the host."""
  from clipvip_jax.checkpoint_io import flatten
  from clipvip_jax.train import model_init
  step_dir = resolve_step(path, which)
  meta = json.loads((step_dir / "meta" / "metadata").read_text()) if (step_dir / "meta" / "metadata").exists() \
      else None
  if meta is None:
    raise FileNotFoundError(f"{step_dir} has no meta item")
  kind = meta["kind"]
  _, config_cls = model_init._classes(kind)  # pylint: disable=protected-access
  cfg = config_cls.from_dict(meta["model"])
  with ocp.PyTreeCheckpointer() as ckpt:
    tree = ckpt.metadata(step_dir / "params").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ckpt.restore(step_dir / "params", args=ocp.args.PyTreeRestore(restore_args=restore_args))
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(_str_keys(restored)).items()}
  return kind, cfg, flat


def _str_keys(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree
