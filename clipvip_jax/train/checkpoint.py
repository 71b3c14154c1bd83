"""Training checkpoints: Orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Each step directory holds five items, saved together and asynchronously (the device->host copy blocks, the
writes run in the background while training continues):
  params     the parameter pytree (float32, sharded arrays; restored onto any mesh with target shardings)
  opt_state  the optimiser state (moments and update count; frozen parameters have none)
  data       {"state": the input position (JSON text: the next global row and the settings that fix the order),
             the same on every process: resuming on any topology reads exactly the batches that follow
  meta       {"step", "kind", "model" (the model config dict), "nonfinite_total", "nonfinite_steps"}
  config     the run config (JSON)
Retention: the latest `keep` checkpoints, plus the best one by a validation metric (saved with the metrics of an
evaluation at that step), via Orbax preservation policies. WORKDIR/best.json names the best step and its value.

Faults (docs/training.md, "When things go wrong"): every reader takes the newest step whose items all read back
(`step_damage`: each item's metadata parses and every stored array value of params/opt_state can be read) and
names each newer, damaged step and what is damaged; the trainer moves those to WORKDIR/damaged_checkpoints/ (kept,
never deleted) so that it can save those steps again. Folders of saves that died midway
(`N.orbax-checkpoint-tmp*`) are removed when a Checkpointer starts, and a failed save is one sentence
(CheckpointSaveError).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_FILE = "best.json"
ITEMS = ("params", "opt_state", "data", "meta", "config")
ARRAY_ITEMS = ("params", "opt_state")  # Orbax StandardSave (OCDBT); the others are JSON (item/metadata)
READER_ITEMS = ("params", "meta")  # what eval / encode / init read of a step
DAMAGED_DIR = "damaged_checkpoints"
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step (or item) folder being written


class DamagedCheckpointError(ValueError):
  """The checkpoint asked for, or every checkpoint of a workdir, is damaged; the message names the steps and
  what is damaged. A ValueError: the commands report it as one sentence with exit status 2."""


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (a full disk, a quota, a lost mount); the message is one sentence naming the
  step and the folder."""


def _first_clause(error: BaseException) -> str:
  """The reason of a TensorStore/Orbax error without its context chain: `OUT_OF_RANGE: Requested byte range ...`."""
  text = " ".join(str(error).split())
  return text.split("; ")[0][:300] or type(error).__name__


def _json_damage(path: pathlib.Path, label: str) -> str | None:
  try:
    json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    return f"{label} is missing"
  except (OSError, ValueError) as e:
    return f"{label} is not readable JSON ({_first_clause(e)})"
  return None


def _array_damage(item: pathlib.Path, name: str) -> str | None:
  """Damage of an OCDBT array item: missing or unparsable metadata, missing arrays, unreadable stored values."""
  meta_path = item / "_METADATA"
  problem = _json_damage(meta_path, f"{name}/_METADATA")
  if problem:
    return problem
  meta = json.loads(meta_path.read_text(encoding="utf-8"))
  if not meta.get("use_ocdbt", False):
    return None  # a per-array layout this project never writes: its metadata is all we check
  if not (item / "manifest.ocdbt").is_file():
    return f"{name}/manifest.ocdbt is missing"
  import tensorstore as ts
  marker = "zarr.json" if meta.get("use_zarr3") else ".zarray"
  try:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": item.absolute().as_uri() + "/"}).result()
    keys = kv.list().result()
    listed = {k.decode() for k in keys}
    for path, info in (meta.get("tree_metadata") or {}).items():
      value = info.get("value_metadata") or {}
      if value.get("skip_deserialize") or value.get("value_type") not in ("jax.Array", "np.ndarray"):
        continue
      array = ".".join(k["key"] for k in info.get("key_metadata", []))
      if f"{array}/{marker}" not in listed:
        return f"{name} has no stored array {array!r}"
    # Read every stored value, a few at a time (a chunk can be a whole large array): a truncated or missing data
    # file fails here, in this thread, instead of inside Orbax's restore with a traceback per pending read.
    for start in range(0, len(keys), 8):
      futures = [(k, kv.read(k)) for k in keys[start:start + 8]]
      for key, future in futures:
        if future.result().state != "value":
          return f"{name} value {key.decode()!r} is missing"
  except (ValueError, RuntimeError, OSError) as e:
    return f"{name} data cannot be read ({_first_clause(e)})"
  return None


def step_damage(step_dir: str | pathlib.Path, items: tuple[str, ...] = ITEMS) -> str | None:
  """None when every one of `items` of a step folder reads back, else what is damaged, e.g. "params/_METADATA is
  missing" or "params data cannot be read (OUT_OF_RANGE: ...)". Reads every stored value (the cost of reading
  the checkpoint once more), which is what finds a truncated data file."""
  step_dir = pathlib.Path(step_dir)
  for name in items:
    item = step_dir / name
    if not item.is_dir():
      return f"{name}/ is missing"
    problem = _array_damage(item, name) if name in ARRAY_ITEMS else _json_damage(item / "metadata",
                                                                                    f"{name}/metadata")
    if problem:
      return problem
  return None


def finished_steps(checkpoints: pathlib.Path) -> list[int]:
  """Steps with a finished (renamed from its temporary name) folder, ascending."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir())


def newest_restorable(checkpoints: pathlib.Path, items: tuple[str, ...] = ITEMS, *, below: int | None = None
                      ) -> tuple[int | None, list[tuple[int, str]]]:
  """(the newest step whose items read back, or None; [(step, damage)] of the newer steps, newest first)."""
  damaged = []
  for step in reversed(finished_steps(checkpoints)):
    if below is not None and step > below:
      continue
    problem = step_damage(checkpoints / str(step), items)
    if problem is None:
      return step, damaged
    damaged.append((step, problem))
  return None, damaged


def describe_damage(checkpoints: pathlib.Path, damaged: list[tuple[int, str]]) -> str:
  return ", ".join(f"step {step} ({problem})" for step, problem in damaged) + f" in {checkpoints}"


def remove_dead_saves(checkpoints: pathlib.Path, report: Callable[[str], None] | None = None) -> list[str]:
  """Removes `N.orbax-checkpoint-tmp*` folders: saves that died (a kill, a full disk) before Orbax renamed them.

  Only safe while no other process saves into the folder: the trainer calls it holding the workdir lock, on
  process 0, before its CheckpointManager exists. Returns the removed names.
  """
  removed = []
  if not checkpoints.is_dir():
    return removed
  for path in sorted(checkpoints.iterdir()):
    if TMP_MARK in path.name and path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path.name)
  if removed and report is not None:
    report(f"removed {len(removed)} unfinished checkpoint folder(s) of saves that did not complete in "
           f"{checkpoints}: {', '.join(removed)}")
  return removed


def set_damaged_aside(checkpoints: pathlib.Path, steps: list[int]) -> list[pathlib.Path]:
  """Moves damaged step folders to WORKDIR/damaged_checkpoints/N (N-<time> if taken): out of Orbax's sight, so
  the run can save those steps again, but kept for the user to inspect or delete."""
  target_root = checkpoints.parent / DAMAGED_DIR
  moved = []
  for step in steps:
    target_root.mkdir(exist_ok=True)
    target = target_root / str(step)
    if target.exists():
      target = target_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(checkpoints / str(step), target)
    moved.append(target)
  return moved


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# Orbax's replica-parallel save splits every replicated array (data parallelism replicates all of them) into one
# slice per replica, each cut by a dispatched device op, so that the hosts holding replicas write a share each. On
# one process every slice is written by that process anyway: ~1 ms per slice, 1.7 s per save of the tiny test
# model on 8 devices, for nothing. So it is on only across processes, and only for slices of at least 1 MiB (a
# B/16 weight matrix over 16 hosts; biases and LayerNorms are written whole by one host).
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1,
                                                min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True)


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
    if jax.process_index() == 0:  # before the manager lists the folder; the caller holds the workdir lock
      remove_dead_saves(self.workdir / CHECKPOINT_DIR, log.warning)
    _sync("clipvip_checkpoint_cleanup")
    _register_array_handler()
    self.manager = ocp.CheckpointManager(self.workdir / CHECKPOINT_DIR, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restorable_step(self, report: Callable[[str], None] = log.warning) -> int | None:
    """The newest step whose items all read back (None: no checkpoint yet).

    Newer damaged steps are reported (`report`, one sentence naming each step and its damage) and moved to
    WORKDIR/damaged_checkpoints/, so that the run saves those steps again. Process 0 checks and moves, the others
    take its answer. Raises DamagedCheckpointError when checkpoints exist but none reads back (nothing is moved).
    """
    checkpoints = self.workdir / CHECKPOINT_DIR
    step, damaged, code = None, [], -1
    if jax.process_index() == 0:
      step, damaged = newest_restorable(checkpoints)
      code = -2 if step is None and damaged else (-1 if step is None else step)
    code = _broadcast_int(code)
    if code == -2:
      if jax.process_index() == 0:
        raise DamagedCheckpointError(
            f"every checkpoint is damaged: {describe_damage(checkpoints, damaged)}; move them out of "
            f"{checkpoints} to start the run over")
      raise DamagedCheckpointError(f"every checkpoint in {checkpoints} is damaged (process 0 names them)")
    if damaged:
      moved = set_damaged_aside(checkpoints, [s for s, _ in damaged])
      report(f"damaged checkpoint {describe_damage(checkpoints, damaged)}; resuming from step {code} instead "
             f"(the damaged folder(s) moved to {', '.join(str(m) for m in moved)})")
    _sync("clipvip_checkpoint_restorable")
    self.manager.reload()
    return None if code < 0 else code

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
    try:  # also where the previous asynchronous save's failure surfaces
      saved = self.manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # noqa: BLE001 — Orbax/TensorStore raise ValueError, RuntimeError, OSError alike
      raise self._save_error(e) from e
    if metrics is not None and jax.process_index() == 0:
      self._update_best(step, metrics[self.best_metric])
    return saved

  def _update_best(self, step: int, value: float) -> None:
    path = self.workdir / BEST_FILE
    best = None
    if path.exists():
      try:
        best = json.loads(path.read_text(encoding="utf-8"))
        float(best["value"])
      except (OSError, ValueError, TypeError, KeyError):  # damaged by hand or by a disk: start the record over
        log.warning("%s is unreadable; it is rewritten with step %d", path, step)
        best = None
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
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 — a tree or shape mismatch (the damage was checked before)
      raise ValueError(f"checkpoint step {step} in {self.workdir / CHECKPOINT_DIR} does not fit this run's model "
                       f"or optimiser ({_first_clause(e)})") from e
    return restored.params, restored.opt_state, restored.data.get("state"), dict(restored.meta)

  def _save_error(self, error: BaseException) -> CheckpointSaveError:
    pending = [p.name for p in (self.workdir / CHECKPOINT_DIR).glob(f"*{TMP_MARK}*")]
    steps = ", ".join(sorted(p.split(".")[0] for p in pending)) or "?"
    # TensorStore's message is a chain of contexts ending in the OS error: "... [os_error_code='28']".
    code = re.search(r"os_error_code='(\d+)'", str(error))
    reason = f"{os.strerror(int(code.group(1)))}, errno {code.group(1)}" if code else _first_clause(error)
    return CheckpointSaveError(
        f"saving checkpoint step {steps} in {self.workdir / CHECKPOINT_DIR} failed ({reason}); the earlier "
        f"checkpoints are intact and the unfinished folder is removed when the run restarts")

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 — see save()
      raise self._save_error(e) from e

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 — see save()
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 — the first error is the one to report
        pass
      raise self._save_error(e) from e
    self.manager.close()


def is_workdir(path: str | pathlib.Path) -> bool:
  """A training workdir of this project (has checkpoints/ with at least one step)."""
  root = pathlib.Path(path)
  return (root / CHECKPOINT_DIR).is_dir() and any(p.name.isdigit() for p in (root / CHECKPOINT_DIR).iterdir())


_reported: set[tuple[str, int]] = set()  # damaged steps already named in this process (readers resolve twice)
_checked: dict[str, str | None] = {}  # step folder -> damage, for the readers of this process


def _reader_damage(step_dir: pathlib.Path) -> str | None:
  key = str(step_dir)
  if key not in _checked:
    _checked[key] = step_damage(step_dir, READER_ITEMS)
  return _checked[key]


def _step_dir(path: pathlib.Path, step: int | None) -> pathlib.Path:
  """The step folder to read: `step`, or the newest one whose params and meta read back (each newer, damaged one
  named on stderr once). A damaged step asked for by number, or no readable step, is a DamagedCheckpointError."""
  root = path / CHECKPOINT_DIR
  steps = finished_steps(root)
  if not steps:
    raise FileNotFoundError(f"{root} holds no finished checkpoint")
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"{root} has no checkpoint of step {step}; it has {steps}")
    problem = _reader_damage(root / str(step))
    if problem:
      raise DamagedCheckpointError(f"checkpoint step {step} in {root} is damaged ({problem})")
    return root / str(step)
  damaged = []
  for candidate in reversed(steps):
    problem = _reader_damage(root / str(candidate))
    if problem is None:
      new = [(s, p) for s, p in damaged if (str(root), s) not in _reported]
      if new:
        _reported.update((str(root), s) for s, _ in new)
        warn(f"damaged checkpoint {describe_damage(root, new)}; using step {candidate} instead")
      return root / str(candidate)
    damaged.append((candidate, problem))
  raise DamagedCheckpointError(f"every checkpoint is damaged: {describe_damage(root, damaged)}")


def warn(text: str) -> None:
  """A reader's one-line notice on stderr (eval, encode and search configure no logging)."""
  import sys
  print(f"warning: {text}", file=sys.stderr, flush=True)


def _broadcast_int(value: int) -> int:
  """Process 0's `value` on every process (itself on one process)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def resolve_step(path: str | pathlib.Path, which: str | int | None = None) -> pathlib.Path:
  """The step directory of a workdir: `which` = None/"latest", "best" (best.json) or a step number.

  Absolute, because Orbax reads no item metadata through a relative path.
  """
  root = pathlib.Path(path).absolute()
  if which == "best":
    best = root / BEST_FILE
    if not best.exists():
      raise FileNotFoundError(f"{root} has no {BEST_FILE} (no evaluation with checkpoint.best_metric ran)")
    try:
      step = int(json.loads(best.read_text(encoding="utf-8"))["step"])
    except (ValueError, TypeError, KeyError):
      raise ValueError(f"{best} is not a readable best-checkpoint record (JSON with a 'step'); give --which "
                       "latest or a step number") from None
    return _step_dir(root, step)
  return _step_dir(root, None if which in (None, "latest") else int(which))


def load_workdir_params(path: str | pathlib.Path, which: str | int | None = None
                        ) -> tuple[str, Any, dict[str, np.ndarray]]:
  """(kind, model config object, flat float32 numpy params) of a workdir checkpoint, restored on the host."""
  return read_step_params(resolve_step(path, which))


def read_step_params(step_dir: pathlib.Path) -> tuple[str, Any, dict[str, np.ndarray]]:
  """(kind, model config object, flat float32 numpy params) of one step folder (from `resolve_step`)."""
  from clipvip_jax import kinds
  from clipvip_jax.converted_checkpoint import restore_params
  meta_path = step_dir / "meta" / "metadata"
  if not meta_path.exists():
    raise FileNotFoundError(f"{step_dir} has no meta item")
  meta = json.loads(meta_path.read_text())
  kind = meta["kind"]
  cfg = kinds.config_from_dict(kind, meta["model"])
  flat = {k: np.asarray(v, np.float32) for k, v in restore_params(step_dir / "params").items()}
  return kind, cfg, flat
