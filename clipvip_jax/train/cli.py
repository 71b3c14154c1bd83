"""Command lines of the trainer and the evaluator: config files with `--config.a.b=value` overrides.

  python -m clipvip_jax.train --config configs/clipvip_msrvtt.py[:ARG] --workdir DIR [--config.key=value ...]
  python -m clipvip_jax.eval  --checkpoint WORKDIR|DIR|FILE [--config configs/X.py[:ARG]] [--which best]
                              [--split test] [--output results.json] [--config.key=value ...]

A config file is a Python module with `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision style);
`:ARG` after the path is passed as `arg` (e.g. configs/clipvip_pretrain.py:B/16). What it returns is checked
against the schema (train/config_schema.py: every key declared once, defaults filled in, locked). An override
names a declared key (dotted path) and gives a Python literal (`--config.optim.lr=1e-5`, `--config.mesh='(2,4,1)'`)
or a bare string; an unknown key (named with the closest declared one), a bad value, a missing file: one sentence
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import sys
from typing import Any, Sequence

import ml_collections

from clipvip_jax.runtime.cli_errors import UsageError  # noqa: F401 (the commands' one-sentence error)
from clipvip_jax.train import config_schema


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> the ConfigDict its get_config(arg) returns, completed by the schema (locked)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise UsageError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 — a broken config file is a user error, shown as one sentence
    raise UsageError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise UsageError(f"config file {path} has no get_config() function")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f"config file {path}: get_config({arg!r}) failed: {e}") from None
  try:
    return config_schema.complete(config, f"config file {path}")
  except config_schema.SchemaError as e:
    raise UsageError(str(e)) from None


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string: --config.data.shard_dir=/data/msrvtt


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets the existing key `dotted` (a.b.c) of `config` to the literal `text`; UsageError naming an unknown key
  and the closest declared one."""
  names = dotted.split(".")
  node = config
  for i, name in enumerate(names):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise UsageError(f"--config.{dotted}: {config_schema.unknown_key_message('.'.join(names[:i + 1]), known)}")
    if i < len(names) - 1:
      node = node[name]
  leaf = names[-1]
  value = _literal(text)
  old = node[leaf]
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
    value = ml_collections.ConfigDict(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise UsageError(f"--config.{dotted}={text}: {e}") from None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.a.b=v` / `--config.a.b v` from the other arguments."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(args):
          raise UsageError(f"{arg} needs a value (--config.{key}=VALUE)")
        value, i = args[i + 1], i + 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def config_from_args(spec: str, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
  config = load_config(spec)
  for key, value in overrides:
    apply_override(config, key, value)
  return config


def _fail(prog: str, message: str) -> int:
  print(f"{prog}: error: {message}", file=sys.stderr)
  return 2


def train_main(argv: Sequence[str] | None = None) -> int:
  prog = "python -m clipvip_jax.train"
  parser = argparse.ArgumentParser(prog=prog, description="Train CLIP-ViP / CLIP2Video / meanP from a config file.",
                                   epilog="Override any config field with --config.KEY=VALUE (dotted keys).")
  parser.add_argument("--config", required=True, help="config file, optionally :ARG (configs/clipvip_pretrain.py:B/16)")
  parser.add_argument("--workdir", required=True, help="run folder: checkpoints, TensorBoard logs, summary.json; "
                      "an existing one is resumed from its latest checkpoint")
  try:
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    config = config_from_args(args.config, overrides)
    from clipvip_jax.train import run_config, trainer
    trainer.check_config(config)
    run_config.check_values(config)
  except UsageError as e:
    return _fail(prog, str(e))
  except ValueError as e:
    return _fail(prog, f"invalid config: {e}")
  from clipvip_jax.runtime.cli_errors import one_sentence, quiet_library_logs
  from clipvip_jax.train import checkpoint as ckpt_lib
  from clipvip_jax.train import logging as run_logging
  from clipvip_jax.train import workdir_lock
  from data_pipelines import sources
  run_logging.log_to_terminal()
  quiet_library_logs()
  try:
    summary = trainer.train(config, args.workdir)
  except (trainer.NonFiniteError, workdir_lock.WorkdirLockedError, ckpt_lib.CheckpointSaveError,
          run_config.NotResumableError, ckpt_lib.DamagedCheckpointError, sources.DamagedShardError) as e:
    return _fail(prog, one_sentence(e))  # each names the workdir, step or process itself
  except (OSError, ValueError) as e:  # missing shards, an unwritable workdir, mismatched checkpoint and config
    return _fail(prog, f"{type(e).__name__}: {one_sentence(e)}")
  except KeyboardInterrupt:  # the second Ctrl-C: the first one had asked for a save at the next step boundary
    print(f"{prog}: interrupted again: stopped at once without saving; the last complete checkpoint in "
          f"{args.workdir} is intact", file=sys.stderr)
    return 130
  print(json.dumps({k: summary[k] for k in ("step", "preempted", "val", "perf") if k in summary}, default=float))
  return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
  prog = "python -m clipvip_jax.eval"
  parser = argparse.ArgumentParser(prog=prog, description="Retrieval metrics of a checkpoint on an evaluation split.")
  parser.add_argument("--checkpoint", required=True,
                      help="training workdir, converted checkpoint directory or original checkpoint file")
  parser.add_argument("--config", help="config file (default: the workdir's config.json)")
  parser.add_argument("--which", default="latest", help="workdir checkpoint: latest, best or a step number")
  parser.add_argument("--split", help="evaluation split (default: config.eval.split)")
  parser.add_argument("--output", help="results JSON (default: WORKDIR/eval_SPLIT_stepN.json or stdout)")
  parser.add_argument("--dtype", default="float32", help="compute dtype for encoding")
  try:
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    from clipvip_jax.train import checkpoint as ckpt_lib
    ckpt = pathlib.Path(args.checkpoint)
    if not ckpt.exists():
      raise UsageError(f"checkpoint {ckpt} does not exist")
    if args.config:
      config = config_from_args(args.config, overrides)
    elif (ckpt / "config.json").is_file() and ckpt_lib.is_workdir(ckpt):
      from clipvip_jax.train import run_config
      try:
        config = ml_collections.ConfigDict(run_config.read(ckpt / "config.json"))
      except ValueError as e:  # names the file; a config file can stand in for it
        raise UsageError(f"{e}; pass --config with the run's config file instead") from None
      for key, value in overrides:
        apply_override(config, key, value)
    else:
      raise UsageError("--config is required unless --checkpoint is a training workdir (with its config.json)")
    split = args.split or (config.get("eval") or {}).get("split")
    if not split:
      raise UsageError("no evaluation split: give --split or set config.eval.split")
    from clipvip_jax.train import run_config
    if args.dtype not in run_config.FLOAT_DTYPES:
      raise UsageError(f"--dtype {args.dtype} is not one of {', '.join(run_config.FLOAT_DTYPES)}")
    from clipvip_jax.runtime.cli_errors import quiet_library_logs
    quiet_library_logs()
    from clipvip_jax.train.evaluator import dump, format_table
    result = evaluate_checkpoint(config, str(ckpt), split, which=args.which, dtype=args.dtype)
  except UsageError as e:
    return _fail(prog, str(e))
  except (OSError, ValueError) as e:
    from clipvip_jax.runtime.cli_errors import one_sentence
    from clipvip_jax.train import checkpoint as ckpt_lib
    from data_pipelines import sources
    if isinstance(e, (ckpt_lib.DamagedCheckpointError, sources.DamagedShardError)):
      return _fail(prog, one_sentence(e))  # names the step or file itself
    return _fail(prog, f"{type(e).__name__}: {one_sentence(e)}")
  import jax
  if jax.process_index() != 0:  # every process computed the same metrics; one writes and prints them
    return 0
  print(format_table(result))
  output = args.output
  if output is None and ckpt_lib.is_workdir(ckpt):
    output = str(ckpt / f"eval_{split}_step{result.get('step', 'x')}.json")
  if output:
    dump(result, output)
    print(f"wrote {output}")
  else:
    print(json.dumps(result, indent=2, default=float))
  return 0


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, split: str, *, which: str = "latest",
                        dtype: str = "float32") -> dict[str, Any]:
  """Library form of the eval command: metrics of `checkpoint` on `split` with the config's data settings."""
  from clipvip_jax import kinds
  from clipvip_jax.runtime import distributed
  from clipvip_jax.train.evaluator import Evaluator
  from clipvip_jax.train import model_init, sharding
  from data_pipelines import pipeline
  distributed.initialize(f"eval {checkpoint}")  # several processes: each encodes its slice of the videos
  from clipvip_jax import loading
  # The run's config.init.config describes an original file; converted dirs and workdirs carry their own.
  own_config = loading.source_of(pathlib.Path(checkpoint)).carries_config
  loaded = loading.load_checkpoint(checkpoint, None if own_config else (config.get("init") or {}).get("config"),
                                   step=which)
  kind, flat, step = loaded.kind, loaded.params, loaded.step
  cfg = kinds.replace_in_config(loaded.config, dtype=dtype)
  mesh = sharding.make_mesh(config.get("mesh", (-1, 1, 1)))
  rules = tuple(tuple(r) for r in config.get("sharding_rules", sharding.DEFAULT_RULES))
  graphdef, rest, shardings = model_init.param_shardings(kind, cfg, mesh, rules)
  params = model_init.place_params(flat, shardings)
  from clipvip_jax.train.trainer import eval_data_config
  data_cfg = {**eval_data_config(config), "split": split}
  evaluator = Evaluator(pipeline.make_eval_dataset(data_cfg), graphdef, rest, shardings, mesh, rules)
  result = evaluator(params)
  result.update({"checkpoint": checkpoint, "split": split, "kind": kind})
  if step is not None:
    result["step"] = step
  return result
