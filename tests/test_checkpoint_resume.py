"""Checkpointing through the real trainer on synthetic shards: SIGTERM at step k then resume equals an uninterrupted
run (bit-identical parameters, same batches); a planted NaN batch is reported and skipped; an 8-device checkpoint
restores onto 1 device; the eval command reads a workdir."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from conftest import synthetic_shards

from clipvip_jax.train import checkpoint as ckpt_lib
from clipvip_jax.train import sharding, trainer
from clipvip_jax.train.cli import load_config

TOTAL, STOP_AT, NAN_AT = 6, 2, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return synthetic_shards(tmp_path_factory, num_clips=48, seed=1)


def _config(shard_dir, mesh=(8, 1, 1), cache_dir=""):
  if len(jax.devices()) < int(np.prod(mesh)):
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  config = load_config("configs/tiny_test.py")
  config.data.shard_dir = str(shard_dir)
  config.total_steps = TOTAL
  config.log_every = 1
  config.eval.split = ""  # no evaluation inside these runs
  config.mesh = mesh
  config.compilation_cache_dir = str(cache_dir)
  return config


def _plant_nan(step, batch):
  if step == NAN_AT:
    batch["video"][0, 0, 0, 0, 0] = np.nan
  return batch


class _Recorder:
  """Records each step's clip indices; optionally sends this process SIGTERM after step `kill_at`."""

  def __init__(self, kill_at=None):
    self.clips, self.kill_at = {}, kill_at

  def __call__(self, step, batch):
    self.clips[step] = np.asarray(batch["clip_index"]).tolist()
    if step == self.kill_at:
      os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def runs(shards, compile_cache, tmp_path_factory):
  """An uninterrupted run, and one preempted by SIGTERM after step STOP_AT and resumed."""
  full_dir, split_dir = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("split")
  full_rec, first_rec, second_rec = _Recorder(), _Recorder(kill_at=STOP_AT), _Recorder()
  config = _config(shards, cache_dir=compile_cache)
  full = trainer.train(config, full_dir, hooks=trainer.Hooks(_plant_nan, full_rec))
  first = trainer.train(config, split_dir, hooks=trainer.Hooks(_plant_nan, first_rec))
  second = trainer.train(config, split_dir, hooks=trainer.Hooks(_plant_nan, second_rec))
  return {"full": (full, full_rec, full_dir), "first": (first, first_rec), "second": (second, second_rec, split_dir)}


def test_sigterm_saves_and_resume_is_bit_identical(runs):
  full, full_rec, full_dir = runs["full"]
  first, first_rec = runs["first"]
  second, second_rec, split_dir = runs["second"]
  assert first["preempted"] and first["step"] == STOP_AT
  assert not second["preempted"] and second["step"] == TOTAL
  # The resumed run reads exactly the batches the uninterrupted run read after step k.
  assert sorted(second_rec.clips) == list(range(STOP_AT + 1, TOTAL + 1))
  for step in range(1, TOTAL + 1):
    rec = first_rec if step <= STOP_AT else second_rec
    assert rec.clips[step] == full_rec.clips[step], f"batch of step {step} differs"
  _, _, p_full = ckpt_lib.load_workdir_params(full_dir)
  _, _, p_split = ckpt_lib.load_workdir_params(split_dir)
  assert p_full.keys() == p_split.keys()
  for k in p_full:
    np.testing.assert_array_equal(p_full[k], p_split[k], err_msg=k)


def test_planted_nan_batch_is_reported_and_skipped(runs):
  full, _, _ = runs["full"]
  second, _, _ = runs["second"]
  assert full["nonfinite_steps"] == [NAN_AT] and second["nonfinite_steps"] == [NAN_AT]
  assert full["step"] == TOTAL and np.isfinite(full["train"]["loss"])  # the run went on to the end


def test_eight_device_checkpoint_restores_on_one_device(runs):
  _, _, full_dir = runs["full"]
  config = _config(full_dir, mesh=(1, 1, 1))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.sharding_rules)
  setup = trainer.setup_training(config, mesh, rules, TOTAL)
  checkpointer = ckpt_lib.Checkpointer(full_dir)
  try:
    params, opt_state, data_state, meta = checkpointer.restore(TOTAL, setup.model.params, setup.model.shardings,
                                                               setup.opt_state, setup.opt_shardings)
  finally:
    checkpointer.close()
  assert meta["step"] == TOTAL and data_state
  for leaf in jax.tree.leaves((params, opt_state)):
    assert leaf.sharding.device_set == {jax.devices()[0]}
  _, _, saved = ckpt_lib.load_workdir_params(full_dir)
  from clipvip_jax.train.optim import path_name
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    np.testing.assert_array_equal(np.asarray(leaf), saved[path_name(path)])
  assert int(opt_state[1].count) == TOTAL - 1  # the NaN step applied no update


def test_eval_command_writes_results_json(runs, tmp_path, capsys):
  from clipvip_jax.train import cli
  _, _, full_dir = runs["full"]
  out = tmp_path / "results.json"
  assert cli.eval_main(["--checkpoint", str(full_dir), "--split", "test", "--output", str(out),
                        "--config.eval.batch_size=16"]) == 0
  result = json.loads(out.read_text())
  for key in ("t2v/R@1", "t2v/R@5", "t2v/R@10", "t2v/MdR", "t2v/MnR", "v2t/R@1", "dsl_t2v/R@1", "dsl_v2t/MnR"):
    assert key in result
  assert result["protocol"] == "single" and result["step"] == TOTAL and result["num_videos"] == result["num_texts"]
  assert "R@1" in capsys.readouterr().out


@pytest.mark.slow
def test_run_stops_after_max_consecutive_nonfinite_steps(shards, tmp_path):
  config = _config(shards, mesh=(2, 1, 1))
  config.max_nonfinite_steps = 2

  def poison(step, batch):
    if step >= 2:
      batch["video"][:] = np.nan
    return batch

  with pytest.raises(trainer.NonFiniteError, match="2 consecutive"):
    trainer.train(config, tmp_path, hooks=trainer.Hooks(transform_host_batch=poison))


def test_clipvip_initialised_from_a_converted_clip(tmp_path):
  """A plain CLIP checkpoint fills the CLIP part of a CLIP-ViP; the new parameters start as the original's."""
  from flax import nnx

  from clipvip_jax import converted_checkpoint
  from clipvip_jax.convert.common import Converted
  from clipvip_jax.models import clip
  from clipvip_jax.params import flat_params
  from clipvip_jax.train import model_init
  config = _config(tmp_path, mesh=(2, 1, 1))
  clip_cfg = model_init.model_config(config.model).clip
  clip_flat = {k: np.asarray(v) for k, v in flat_params(clip.CLIP(clip_cfg, rngs=nnx.Rngs(7))).items()}
  converted_checkpoint.save_converted(Converted("clip", clip_cfg, clip_flat), tmp_path / "clip")
  config.init.checkpoint = str(tmp_path / "clip")
  mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
  ms = model_init.init_model(config, mesh, tuple(tuple(r) for r in config.sharding_rules))
  got = {k: np.asarray(v) for k, v in flat_params(ms.model()).items()}
  for k, v in clip_flat.items():
    if k != "logit_scale":
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert got["logit_scale"] == pytest.approx(4.6)  # the original overwrites CLIP's temperature
  assert np.abs(got["vision/added_cls"]).mean() > 0.3  # N(0, 1) proxies
  np.testing.assert_array_equal(got["vision/temporal_embedding"], 0.0)
