"""The trainer, top to bottom: config -> mesh -> data -> model -> optimiser -> checkpoint/resume -> step -> loop.

  from clipvip_jax.train.trainer import train
  summary = train(config, "workdir/run1")   # config: an ml_collections ConfigDict (configs/*.py get_config())

The loop does no host work per step beyond dispatching the compiled step, feeding the progress bar and keeping a
reference to the step's metrics; every `log_every` steps the pending metrics come to the host in one transfer,
which is when TensorBoard is written, non-finite steps are reported and step time / clips per second / MFU are
measured. Evaluation and checkpoints run at their own intervals; SIGTERM (a preemption) makes the loop save at
the next step boundary and return, and the next `train` on the same workdir resumes from there: same
parameters, optimiser state and data order as a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from clipvip_jax.models import layers
from clipvip_jax.runtime import host_allocator
from clipvip_jax.train import checkpoint as ckpt_lib
from clipvip_jax.train import logging as run_logging
from clipvip_jax.train import config_schema, model_init, optim, run_config, sharding, workdir_lock
from clipvip_jax.train import step as step_lib

log = run_logging.log


class NonFiniteError(RuntimeError):
  """Too many consecutive (or total) steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class Hooks:
  """Optional callbacks (tests, the demo): `transform_host_batch(step, host_batch) -> host_batch` edits a numpy
  batch before it goes to the devices; `on_step(step, device_batch)` runs after the step's dispatch."""
  transform_host_batch: Callable[[int, dict], dict] | None = None
  on_step: Callable[[int, Mapping[str, jax.Array]], None] | None = None


# ------------------------------------------------------------------------------------------------ setup helpers


def maybe_initialize_distributed(label: str | None = None) -> None:
  """jax.distributed on every multi-process launch (clipvip_jax.runtime.distributed: plain env, SLURM, Open MPI, Cloud
  TPU, Kubernetes); a no-op for one process."""
  from clipvip_jax.runtime import distributed
  distributed.initialize(label)
  if jax.process_count() > 1:
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def as_config_dict(config: Any) -> ml_collections.ConfigDict:
  """The run config checked against the schema (config_schema.SchemaError, a ValueError naming the key), every
  default filled in, locked."""
  return config_schema.complete(config)


REQUIRED = ("model", "data", "optim", "mode")


def check_config(config: ml_collections.ConfigDict) -> None:
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f"config lacks the section(s) {missing}")
  if not config.get("total_steps") and not config.get("num_epochs"):
    raise ValueError("config needs total_steps or num_epochs")
  if config.mode not in step_lib.MODES:
    raise ValueError(f"config.mode = {config.mode!r}; known: {step_lib.MODES}")
  sharding.check_constrain_activations(config.get("constrain_activations"))


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Fails before any compilation when the shards of the training or evaluation split or the initial checkpoint
  are missing (FileNotFoundError naming the folder and split)."""
  from data_pipelines import sources
  sources.shard_paths(config.data.shard_dir, config.data.get("split", "train"))  # also tfds:NAME sources
  eval_cfg = config.get("eval") or {}
  if eval_cfg.get("split"):
    sources.shard_paths((eval_cfg.get("data") or {}).get("shard_dir") or config.data.shard_dir, eval_cfg.split)
  checkpoint = (config.get("init") or {}).get("checkpoint")
  if checkpoint and not pathlib.Path(checkpoint).exists():
    raise FileNotFoundError(f"config.init.checkpoint {checkpoint} does not exist")


def constrain_activations(config: ml_collections.ConfigDict, mesh) -> bool:
  """Whether the run pins each block's residual stream to the batch split, for the chip the model is built for
  (the planner's target, else this machine's backend)."""
  return sharding.resolve_constrain_activations(config.get("constrain_activations"), mesh,
                                                layers.current_target().platform)


def total_steps_of(config: ml_collections.ConfigDict) -> int:
  """config.total_steps, else ceil(num_epochs * training clips / global batch) as the originals count."""
  if config.get("total_steps"):
    return int(config.total_steps)
  from data_pipelines import sources
  num_clips = len(sources.open_split(config.data.shard_dir, config.data.get("split", "train")))
  return math.ceil(config.num_epochs * num_clips / config.data.batch_size)


def batch_devices(mesh, rules) -> int:
  axes = sharding.batch_sharding(mesh, rules, 1).spec[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


class _MappedIterator:
  """Applies `fn(step, batch)` to host batches, numbering them from `first_step`; forwards get/set_state."""

  def __init__(self, iterator: Any, fn: Callable[[int, dict], dict], first_step: int):
    self._iterator, self._fn, self._next_step = iterator, fn, first_step

  def __iter__(self) -> "_MappedIterator":
    return self

  def __next__(self) -> dict:
    batch = self._fn(self._next_step, next(self._iterator))
    self._next_step += 1
    return batch

  def get_state(self) -> Any:
    return self._iterator.get_state()

  def set_state(self, state: Any) -> None:
    self._iterator.set_state(state)


class _Preemption:
  """SIGTERM (a preemption, `scancel`, a TPU maintenance event) and Ctrl-C ask for a save at the next step
  boundary; a second Ctrl-C stops at once (KeyboardInterrupt).

  One process: Python handlers set a flag. Several processes: every process must save the SAME step, so the
  decision goes through JAX's preemption sync point (`reached(step)`, checked every step): the distributed
  runtime catches SIGTERM itself (no Python SIGTERM handler may replace its handler) and the processes agree on
  the first step boundary that all of them reach after the notice. Ctrl-C is turned into that SIGTERM.
  """

  def __init__(self, checkpointer: Any):
    self._checkpointer = checkpointer
    self._multi = jax.process_count() > 1
    self._local = False
    self._interrupts = 0
    self._previous: dict[int, Any] = {}
    wanted = (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM)
    for sig in wanted:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread: only the runtime's multi-host signal remains
        pass

  def _handler(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        raise KeyboardInterrupt
      log.warning("interrupted: saving a checkpoint at the next step boundary (Ctrl-C again to stop at once)")
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # the runtime's own notifier: every process saves the same step
    else:
      self._local = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return bool(self._checkpointer.manager.reached_preemption(step))
    return self._local

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------ the loop


def _make_evaluator(config, ms: model_init.ModelState, mesh, rules):
  eval_cfg = config.get("eval")
  if not eval_cfg or not eval_cfg.get("split"):
    return None
  from clipvip_jax.train.evaluator import Evaluator
  from data_pipelines import pipeline
  return Evaluator(pipeline.make_eval_dataset(eval_data_config(config)), ms.graphdef, ms.rest, ms.shardings, mesh,
                   rules)


def eval_data_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The data config of the run's evaluation split: config.data, then eval.split / eval.batch_size / eval.data."""
  eval_cfg = config.get("eval") or {}
  data_cfg = {**config.data.to_dict(), "split": eval_cfg.get("split") or "val",
              "batch_size": eval_cfg.get("batch_size") or config.data.batch_size, **dict(eval_cfg.get("data") or {})}
  for key in ("pretraining",):  # evaluation reads video-text pairs even when training on omnisource batches
    data_cfg[key] = False
  return data_cfg


@dataclasses.dataclass
class TrainingSetup:
  model: model_init.ModelState
  tx: Any
  schedule: optim.Schedule
  param_rules: Any
  opt_state: Any
  opt_shardings: Any
  objective: step_lib.Objective
  train_step: step_lib.TrainStep


def setup_training(config: ml_collections.ConfigDict, mesh, rules, total_steps: int,
                   initial_params: Mapping[str, np.ndarray] | None = None, *, abstract: bool = False) -> TrainingSetup:
  """Model (sharded init, config.init.checkpoint or `initial_params`), optimiser, its sharded state, the step.

  `abstract`: parameters and optimiser state are sharded ShapeDtypeStructs (no weights read or made, nothing
  placed on a device): the planner lowers `train_step.fn` with them and `step_lib.batch_spec`, so it compiles
  exactly the program this function builds for a real run. The mesh may then be over devices this process cannot
  run on (a TPU slice described by libtpu)."""
  if abstract:
    ms = model_init.abstract_model_state(config, mesh, rules)
  else:
    ms = model_init.init_model(config, mesh, rules, initial_params)
    for line in sharding.describe_shardings(ms.shardings, ms.params)[:20]:
      log.info("sharded: %s", line)
  tx, schedule, param_rules = optim.make_optimizer(config.optim, ms.params, total_steps)
  if not abstract:
    for line in optim.describe_rules(param_rules):
      log.info("%s", line)
  opt_shape = jax.eval_shape(tx.init, ms.params)
  opt_shardings = step_lib.opt_state_shardings(opt_shape, ms.params, ms.shardings, mesh)
  if abstract:
    opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt_shape,
                             opt_shardings)
  else:
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(ms.params)
  objective = step_lib.make_objective(config.mode, config.get("loss"))
  fsdp = mesh.shape.get("fsdp", 1) > 1
  train_step = step_lib.make_train_step(ms.graphdef, ms.rest, objective, tx, param_rules,
                                        grad_accum=int(config.get("grad_accum", 1)), param_shardings=ms.shardings,
                                        opt_shardings=opt_shardings,
                                        batch_sharding=sharding.batch_sharding(mesh, rules, 1),
                                        constrain_activations=(sharding.activation_constraint(mesh, rules)
                                                               if constrain_activations(config, mesh) else None),
                                        gather_weights=sharding.weight_gather(mesh, rules) if fsdp else None)
  return TrainingSetup(ms, tx, schedule, param_rules, opt_state, opt_shardings, objective, train_step)


def train(config: Any, workdir: str | os.PathLike, *, hooks: Hooks | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run of `config` in `workdir`; returns a summary with the final metrics."""
  from data_pipelines import pipeline
  config = as_config_dict(config)
  check_config(config)
  check_inputs(config)
  hooks = hooks or Hooks()
  maybe_initialize_distributed(f"train {workdir}")
  if config.get("compilation_cache_dir"):  # restarts (preemptions, resumed runs) then skip recompilation
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_compilation_cache_dir", str(config.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # jax settles the cache at its first compile: start it over with this folder
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  lock = workdir_lock.WorkdirLock(workdir).acquire(report=log.warning)  # one run per workdir, before any write
  run_config.check_resumable(workdir, config, report=log.warning)  # a model change stops here, config.json intact
  if jax.process_index() == 0:
    run_config.write(workdir, config)
  started = time.time()

  # Mesh and logical-axis rules.
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.get("sharding_rules", sharding.DEFAULT_RULES))
  batch_sharding = sharding.batch_sharding(mesh, rules, 1)
  grad_accum = int(config.get("grad_accum", 1))
  n_batch = batch_devices(mesh, rules)
  if config.data.batch_size % (n_batch * grad_accum):
    raise ValueError(f"data.batch_size {config.data.batch_size} must be divisible by grad_accum ({grad_accum}) x "
                     f"the {n_batch} devices of the mesh's batch axes")
  total_steps = total_steps_of(config)
  log.info("mesh %s on %d devices, %d steps; %s", dict(mesh.shape), mesh.size, total_steps,
           host_allocator.describe())

  # Model, optimiser and the compiled step; then resume from the latest checkpoint when there is one.
  state = setup_training(config, mesh, rules, total_steps)
  ms, tx, schedule, opt_shardings = state.model, state.tx, state.schedule, state.opt_shardings
  params, opt_state, objective, train_step = ms.params, state.opt_state, state.objective, state.train_step
  ckpt_cfg = config.get("checkpoint") or {}
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(ckpt_cfg.get("keep", 3)),
                                       best_metric=ckpt_cfg.get("best_metric"),
                                       best_mode=ckpt_cfg.get("best_mode", "max"),
                                       async_save=bool(ckpt_cfg.get("async_save", True)))
  # This process reads only the rows of each global batch that its devices hold; the order of global batches
  # depends on the data, the seed and the global batch size alone, so a checkpoint resumes on any topology.
  host_iter = pipeline.make_train_iterator(config.data, rows=pipeline.host_rows(batch_sharding,
                                                                                 config.data.batch_size))
  step, nonfinite_steps = 0, []
  latest = checkpointer.restorable_step(report=log.warning)  # damaged newer steps: named, set aside
  if latest is not None:
    params, opt_state, data_state, meta = checkpointer.restore(latest, params, ms.shardings, opt_state,
                                                               opt_shardings)
    if data_state is not None:
      host_iter.set_state(data_state.encode() if isinstance(data_state, str) else data_state)
    step, nonfinite_steps = latest, list(meta.get("nonfinite_steps", []))
    log.info("resumed from %s at step %d", workdir / ckpt_lib.CHECKPOINT_DIR, step)
  if hooks.transform_host_batch is not None:
    host_iter = _MappedIterator(host_iter, hooks.transform_host_batch, step + 1)
  batches = pipeline.prefetch_to_device(host_iter, batch_sharding, size=int(config.get("prefetch", 2)),
                                        global_batch=config.data.batch_size)

  evaluator = _make_evaluator(config, ms, mesh, rules)
  eval_every = int((config.get("eval") or {}).get("every", 0) or 0)
  # Evaluation metrics are named by their split ("val/t2v/R@1"); checkpoint.best_metric names one of them, so a
  # best checkpoint is chosen on the split it names, and a "test/" metric is flagged.
  eval_prefix = f"{(config.get('eval') or {}).get('split') or 'val'}/"
  if str(ckpt_cfg.get("best_metric") or "").startswith("test/"):
    log.warning("checkpoint.best_metric %s selects checkpoints on the test split", ckpt_cfg.best_metric)
  ckpt_every = int(ckpt_cfg.get("every", 0) or 0)
  log_every = max(int(config.get("log_every", 50)), 1)
  max_consecutive = int(config.get("max_nonfinite_steps", 10))
  max_total = int(config.get("max_nonfinite_total") or 0)  # 0: no limit
  logger = run_logging.RunLogger(workdir, total_steps, step, progress=bool(config.get("progress_bar", True)))
  meta_of = lambda: {"kind": ms.kind, "model": ms.config.to_dict(), "nonfinite_steps": nonfinite_steps,
                     "nonfinite_total": len(nonfinite_steps)}

  def save(at: int, eval_metrics: Mapping[str, float] | None = None) -> None:
    checkpointer.save(at, params, opt_state, batches.get_state(), meta_of(), json.loads(config.to_json_best_effort()),
                      metrics=eval_metrics)

  preemption = _Preemption(checkpointer)
  record_batches = bool(config.get("record_batches"))
  if record_batches:
    from jax.experimental import multihost_utils

    def record_batch(at: int, device_batch: Mapping[str, jax.Array]) -> None:
      """config.record_batches: the global batch's clip ids (and valid flags) to WORKDIR/batches.jsonl, one line
      a step, written by process 0: how to check that two topologies or a resumed run see the same data. It
      gathers the batch's ids on every step (a small collective): for debugging, not for production runs."""
      ids, valid = (np.asarray(multihost_utils.process_allgather(device_batch[k], tiled=True))
                    for k in ("clip_index", "valid"))
      if jax.process_index() == 0:
        with open(workdir / "batches.jsonl", "a", encoding="utf-8") as f:
          f.write(json.dumps({"step": at, "clip_index": ids.tolist(), "valid": valid.tolist()}) + "\n")
  compiled, peak = None, run_logging.peak_flops_per_device(config.get("peak_flops_per_device"))
  # MFU counts the model's FLOPs (clipvip_jax/train/model_flops.py: 3 x forward, no recomputation), as the planner.
  from clipvip_jax.train import model_flops
  flops = model_flops.train_step_flops(config.mode, ms.kind, ms.config, config.data) / mesh.size
  pending: list[tuple[int, Any]] = []
  consecutive = 0
  window_start, window_steps = time.time(), 0
  last_train: dict[str, float] = {}
  last_eval: dict[str, Any] = {}
  timing: dict[str, float] = {}
  preempted = False
  masked_rows = [0]  # corrupt records of the global batches, kept in their rows and masked out of the loss

  def flush() -> None:
    """Metrics of the pending steps to the host (one transfer): report non-finite steps, log, time the window."""
    nonlocal pending, consecutive, window_start, window_steps, last_train
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    now = time.time()
    skipped_before = len(nonfinite_steps)
    # The lr of each step from one vectorised schedule call (the schedule counts applied updates).
    lrs = np.asarray(schedule(np.asarray([max(at - 1 - skipped_before, 0) for at, _ in pending])))
    for (at, _), m, lr in zip(pending, fetched, lrs):
      if not bool(m["finite"]):
        consecutive += 1
        nonfinite_steps.append(at)
        logger.message(f"step {at}: non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}); "
                       f"update skipped ({consecutive} consecutive, {len(nonfinite_steps)} total)")
      else:
        consecutive = 0
      values = {k: float(v) for k, v in m.items() if k != "finite"}
      values["lr"] = float(lr)
      if values.get("masked_rows"):
        masked_rows[0] += int(values["masked_rows"])
        logger.message(f"step {at}: {int(values['masked_rows'])} corrupt clip record(s) masked out of the loss "
                       f"({masked_rows[0]} in this run)")
      logger.scalars(at, values)
      last_train = values
    step_time = (now - window_start) / max(window_steps, 1)
    perf = {"step_time_s": step_time, "clips_per_s": config.data.batch_size / step_time}
    if flops and peak:
      perf["mfu"] = flops / (step_time * peak)
    logger.scalars(pending[-1][0], perf, prefix="perf/")
    timing.update(perf)
    pending, window_start, window_steps = [], now, 0
    if consecutive >= max_consecutive or (max_total and len(nonfinite_steps) >= max_total):
      raise NonFiniteError(f"stopping: {consecutive} consecutive / {len(nonfinite_steps)} total steps with a "
                           f"non-finite loss or gradient (limits: max_nonfinite_steps={max_consecutive}, "
                           f"max_nonfinite_total={max_total}); last skipped step {nonfinite_steps[-1]}")

  try:
    while step < total_steps:
      try:
        device_batch = next(batches)
      except StopIteration:
        logger.message(f"the training data ran out at step {step}")
        break
      batch = {k: device_batch[k] for k in objective.batch_keys + step_lib.OPTIONAL_KEYS if k in device_batch}
      if record_batches:
        record_batch(step + 1, device_batch)
      if compiled is None:  # compile once ahead of time (timed; the compiler's FLOPs logged beside the model's)
        t0 = time.time()
        compiled = train_step.fn.lower(params, opt_state, batch).compile()
        compiler_flops = run_logging.compiled_flops(compiled)
        logger.message(f"train step compiled in {time.time() - t0:.1f}s; {flops / 1e9:.2f} GFLOP per step per "
                       f"device (model)" + (f", {compiler_flops / 1e9:.2f} (compiler, with recomputation)"
                                           if compiler_flops else ""))
        window_start = time.time()
      params, opt_state, metrics = compiled(params, opt_state, batch)
      step += 1
      window_steps += 1
      pending.append((step, metrics))
      if hooks.on_step is not None:
        hooks.on_step(step, device_batch)
      logger.advance()
      if step % log_every == 0 or step == total_steps:
        flush()
      eval_metrics = None
      if evaluator is not None and eval_every and step % eval_every == 0 and step < total_steps:
        flush()
        last_eval = evaluator(params)
        eval_metrics = {f"{eval_prefix}{k}": v for k, v in _scalars(last_eval).items()}
        logger.scalars(step, _scalars(last_eval), prefix=eval_prefix)
        logger.message(f"step {step}: val t2v R@1 {last_eval['t2v/R@1']:.1f}, v2t R@1 {last_eval['v2t/R@1']:.1f}")
        window_start, window_steps = time.time(), 0
      if ((ckpt_every and step % ckpt_every == 0) or eval_metrics is not None) and step < total_steps:
        save(step, eval_metrics)
      if preemption.reached(step):
        flush()
        save(step)
        logger.message(f"preempted: saved step {step} in {workdir}; run again to resume")
        preempted = True
        break
    if not preempted:
      flush()
      if evaluator is not None and step >= total_steps:
        last_eval = evaluator(params)
        logger.scalars(step, _scalars(last_eval), prefix=eval_prefix)
        logger.message(f"final val t2v R@1 {last_eval['t2v/R@1']:.1f}, v2t R@1 {last_eval['v2t/R@1']:.1f}")
      save(step, {f"{eval_prefix}{k}": v for k, v in _scalars(last_eval).items()} if last_eval else None)
  except Exception as e:
    from clipvip_jax.runtime import distributed
    if distributed.is_lost_peer(e):  # another process is gone: one sentence, no cleanup that would wait for it
      distributed.exit_lost_peer(e)
    raise
  finally:
    preemption.restore()
    checkpointer.close()
    logger.close()
    lock.release()
  summary = {"step": step, "total_steps": total_steps, "preempted": preempted, "workdir": str(workdir),
             "nonfinite_steps": list(nonfinite_steps), "masked_rows": masked_rows[0],
             "seconds": round(time.time() - started, 1),
             "train": last_train, "perf": timing, "val": last_eval}
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
  return summary


def _scalars(result: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating)) and k != "seconds"}

