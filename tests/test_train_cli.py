"""The train/eval command lines: config files, `--config.a.b=value` overrides, one-sentence errors with exit 2."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from clipvip_jax.train import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_"))


def test_overrides_reach_nested_keys_with_python_literals():
  rest, overrides = cli.split_overrides(["--workdir", "w", "--config.optim.lr=1e-5", "--config.mesh", "(2,4,1)",
                                         "--config.data.shard_dir=/data/x", "--config.model.config.num_proxies=3"])
  assert rest == ["--workdir", "w"]
  config = cli.config_from_args("configs/tiny_test.py", overrides)
  assert config.optim.lr == 1e-5 and config.mesh == (2, 4, 1)
  assert config.data.shard_dir == "/data/x" and config.model.config.num_proxies == 3


def test_unknown_key_and_bad_value_are_one_sentence_errors():
  with pytest.raises(cli.UsageError, match=r"config.optim.lrr is not a config key; did you mean config.optim.lr\?"):
    cli.config_from_args("configs/tiny_test.py", [("optim.lrr", "1")])
  with pytest.raises(cli.UsageError, match=r"config.optimizer is not a config key; did you mean config.optim\?"):
    cli.config_from_args("configs/tiny_test.py", [("optimizer.lr", "1")])
  with pytest.raises(cli.UsageError, match="--config.total_steps=many"):
    cli.config_from_args("configs/tiny_test.py", [("total_steps", "many")])
  with pytest.raises(cli.UsageError, match="does not exist"):
    cli.load_config("configs/no_such_config.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_recipe_config_loads_and_passes_the_trainer_checks(name):
  from clipvip_jax.train import trainer
  args = {"clipvip_pretrain.py": ("B/32", "B/16")}.get(name, (None,))
  for arg in args:
    config = cli.load_config(f"configs/{name}" + (f":{arg}" if arg else ""))
    trainer.check_config(config)
    assert config.optim.b2 == 0.98 and config.optim.eps == 1e-6


def test_train_main_reports_bad_input_and_exits_2(capsys, tmp_path):
  assert cli.train_main(["--config", "configs/tiny_test.py", "--workdir", str(tmp_path),
                         "--config.optim.lrr=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "config.optim.lrr is not a config key" in err
  assert cli.train_main(["--config", "configs/tiny_test.py", "--workdir", str(tmp_path),
                         "--config.mode=supervised"]) == 2
  assert "config.mode = 'supervised'" in capsys.readouterr().err
  # Missing shards: found before any compilation, named in the message.
  assert cli.train_main(["--config", "configs/tiny_test.py", "--workdir", str(tmp_path),
                         f"--config.data.shard_dir={tmp_path / 'nowhere'}"]) == 2
  assert "nowhere" in capsys.readouterr().err


def test_eval_main_needs_a_config_or_a_workdir(capsys, tmp_path):
  assert cli.eval_main(["--checkpoint", str(tmp_path / "missing")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.eval_main(["--checkpoint", str(tmp_path)]) == 2
  assert "--config is required" in capsys.readouterr().err


def test_module_entry_point_rejects_unknown_key(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "clipvip_jax.train", "--config", "configs/tiny_test.py",
                         "--workdir", str(tmp_path), "--config.data.batchsize=4"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if "error" in line]
  assert lines == ["python -m clipvip_jax.train: error: --config.data.batchsize: config.data.batchsize is not a "
                   "config key; did you mean config.data.batch_size?"]


@pytest.mark.slow
def test_sigterm_to_a_training_process_saves_and_the_rerun_resumes(tmp_path):
  """The real thing: a subprocess gets SIGTERM mid-run, saves, exits 0; the same command finishes the run."""
  from data_pipelines import synthetic
  synthetic.generate(str(tmp_path / "shards"), num_clips=32, seed=0, frames=4, size=32)
  cmd = [sys.executable, "-m", "clipvip_jax.train", "--config", "configs/tiny_test.py", "--workdir",
         str(tmp_path / "run"), f"--config.data.shard_dir={tmp_path / 'shards'}", "--config.total_steps=400",
         "--config.log_every=1", "--config.eval.split=", "--config.mesh=(1,1,1)"]
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 600
  tb = tmp_path / "run" / "tensorboard"
  while time.time() < deadline and not (tb.is_dir() and any(tb.iterdir())):
    time.sleep(1)
  time.sleep(5)  # some steps in
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert '"preempted": true' in out
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and 0 < steps[-1] < 400
  cmd[cmd.index("--config.total_steps=400")] = f"--config.total_steps={steps[-1] + 2}"
  rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f'"step": {steps[-1] + 2}' in rerun.stdout and '"preempted": false' in rerun.stdout


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
  """The run logger's TensorBoard writer (tensorboardX) is imported with torch kept out (it would cost each
  training process ~1.7 s of start-up); the event file holds the scalars, read back with tensorboardX's proto."""
  code = f"""
import struct, sys
from clipvip_jax.train import logging as run_logging
logger = run_logging.RunLogger({str(tmp_path)!r}, total_steps=3, start_step=0, progress=False)
logger.scalars(2, {{"loss": 1.5}})
logger.close()
from tensorboardX.proto import event_pb2
import pathlib
(path,) = pathlib.Path({str(tmp_path)!r}, "tensorboard").glob("events.out.tfevents.*")
data, values = path.read_bytes(), []
while data:
  (n,) = struct.unpack("<Q", data[:8])
  event = event_pb2.Event.FromString(data[12:12 + n])
  values += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  data = data[12 + n + 4:]
print(values, "torch" in sys.modules)
"""
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["[(2,", "'train/loss',", "1.5)]", "False"], r.stdout
