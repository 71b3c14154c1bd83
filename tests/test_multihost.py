"""Several JAX processes (issue 13), run here as 2 local processes x 2 CPU devices over gloo (launch_local) against
1 process x 8 devices (so the topology changes too): the same global batches, losses and parameters; SIGTERM to
every process saves one step and the relaunch finishes bit-identically; checkpoints resume across process and
worker counts at exactly the next global batch; evaluation is the same on any process count. Plus the launcher,
the environment rules and the stderr filter on their own (fast). A SIGKILLed process: tests/test_multihost_lost_process.py.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import synthetic_shards

from clipvip_jax.runtime import distributed
from clipvip_jax.runtime import stderr_filter as _stderr_filter
from clipvip_jax.train import checkpoint as ckpt_lib
from clipvip_jax.train import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 16


# ------------------------------------------------------------------------------------------------ fast checks


def test_wanted_reads_every_launch_kind():
  assert not distributed.wanted({})
  assert not distributed.wanted({"JAX_NUM_PROCESSES": "1", "JAX_COORDINATOR_ADDRESS": "h:1"})
  assert distributed.wanted({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "h:1"})
  assert distributed.wanted({"SLURM_NTASKS": "4"}) and not distributed.wanted({"SLURM_NTASKS": "1"})
  assert distributed.wanted({"OMPI_COMM_WORLD_SIZE": "2"})
  assert distributed.wanted({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
  with pytest.raises(distributed.LaunchError, match="JAX_NUM_PROCESSES"):
    distributed.wanted({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "1"})
  with pytest.raises(distributed.LaunchError, match="JAX_NUM_PROCESSES='two'"):
    distributed.wanted({"JAX_NUM_PROCESSES": "two"})


def test_launch_local_prefixes_output_and_ends_the_others_on_failure():
  script = ("import os, sys, time\n"
            "i = int(os.environ['JAX_PROCESS_ID'])\n"
            "print('hello from', i, os.environ['JAX_NUM_PROCESSES'], os.environ['XLA_FLAGS'], flush=True)\n"
            "if i == 1:\n  sys.exit(3)\n"
            "time.sleep(60)\n")
  started = time.time()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_some_flag=1"}
  done = subprocess.run([sys.executable, "-m", "clipvip_jax.launch_local", "--processes", "2",
                         "--devices-per-process", "3", "--", "python", "-c", script],
                        capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
  assert done.returncode == 3, done.stdout + done.stderr
  assert time.time() - started < 30  # process 0 was ended, not waited for
  lines = done.stdout.splitlines()
  # The device count replaced, the other flags kept.
  assert "[0] hello from 0 2 --xla_some_flag=1 --xla_force_host_platform_device_count=3" in lines
  assert "[1] hello from 1 2 --xla_some_flag=1 --xla_force_host_platform_device_count=3" in lines
  assert any(line.startswith("[launch_local] process 1 ended (exit status 3); ending process(es) 0")
             for line in lines)
  bad = subprocess.run([sys.executable, "-m", "clipvip_jax.launch_local", "--processes", "2", "python"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
  assert bad.returncode == 2 and "after `--`" in bad.stderr


def test_stderr_filter_turns_the_runtime_abort_into_one_sentence(tmp_path):
  lines = [b"step 3 ok\n",
           b"E1202 06:42:12.604561    5120 coordination_service.cc:1549] [55] Use error polling to propagate the "
           b"following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
           b"heartbeats):\n", b"1\n", b"The tasks have crashed. Check the task logs.\n",
           b"F1202 06:42:12.609979    5131 client.h:80] Terminating process because the JAX distributed service "
           b"detected fatal errors.\n", b"*** Check failure stack trace: ***\n", b"    @     0x7f1eba6e40ee  x\n"]
  (tmp_path / "in").write_bytes(control(0, 2) + b"".join(lines))
  out = tmp_path / "out"
  with open(tmp_path / "in", "rb") as stdin, open(out, "wb") as stdout:
    _stderr_filter.run("train w", 0, stdin, stdout)
  text = out.read_text().splitlines()
  assert text[0] == "step 3 ok" and len(text) == 2, text
  assert text[1].startswith("clipvip_jax: train w: process 0 of 2 stops because process 1 stopped responding")
  # The run's own sentence (a collective failed first) is printed once and the runtime's abort after it dropped.
  (tmp_path / "in").write_bytes(distributed.FILTER_CONTROL.encode() + b"say clipvip_jax: train w: lost\n"
                                + b"".join(lines[1:]))
  with open(tmp_path / "in", "rb") as stdin, open(out, "wb") as stdout:
    _stderr_filter.run("train w", 0, stdin, stdout)
  assert out.read_text() == "clipvip_jax: train w: lost\n"
  assert "the coordinator (process 0) is gone" in _stderr_filter.lost_processes(
      "Failed to send RPC to coordination service. Either the leader task was preempted/died")


def control(index, count):
  return distributed.FILTER_CONTROL.encode() + f"process {index} {count}\n".encode()


# ------------------------------------------------------------------------------------------------ real runs


def _train_args(workdir, shards, compile_cache, *extra):
  return ["--config", "configs/tiny_test.py", "--workdir", str(workdir), f"--config.data.shard_dir={shards}",
          f"--config.total_steps={STEPS}", "--config.record_batches=True", "--config.log_every=1",
          "--config.checkpoint.every=4", "--config.checkpoint.keep=10",
          f"--config.compilation_cache_dir={compile_cache}", *extra]


# 2 devices per process: XLA:CPU runs a cross-process collective as one gloo operation per operand across every
# device of the job, and on 2 cores 8 gloo ranks cost ~4x 4 ranks per step (a tiny 16-step run: 51 -> 38 CPU s).
def _launch(args, processes=2, devices=2, **kw):
  command = [sys.executable, "-m", "clipvip_jax.launch_local", "--processes", str(processes),
             "--devices-per-process", str(devices), "--", sys.executable, "-m", *args]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(args, timeout=600, **kw):
  proc = _launch(args, **kw)
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-5000:]
  return out


def _batches(workdir):
  return {b["step"]: b for b in map(json.loads, (pathlib.Path(workdir) / "batches.jsonl").read_text().splitlines())}


def _losses(workdir):
  rows = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _params(workdir, step=None):
  return ckpt_lib.load_workdir_params(workdir, step)[2]


def _wait_for(predicate, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.5)
  raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return synthetic_shards(tmp_path_factory, num_clips=64, seed=5, shard_size=16)


@pytest.fixture(scope="module")
def one_process(shards, compile_cache, tmp_path_factory):
  """The uninterrupted run on 1 process x 8 devices (in this process)."""
  run = tmp_path_factory.mktemp("one") / "run"
  assert cli.train_main(_train_args(run, shards, compile_cache)) == 0
  return run


@pytest.fixture(scope="module")
def two_processes(shards, compile_cache, tmp_path_factory):
  """The uninterrupted run on 2 processes x 2 devices."""
  run = tmp_path_factory.mktemp("two") / "run"
  _run(["clipvip_jax.train", *_train_args(run, shards, compile_cache)])
  return run


@pytest.mark.slow
def test_two_processes_see_the_batches_losses_and_params_of_one(one_process, two_processes):
  one, two = _batches(one_process), _batches(two_processes)
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  assert one == two  # the same clip ids in every global batch
  assert len({tuple(b["clip_index"]) for b in one.values()}) == STEPS
  loss_one, loss_two = _losses(one_process), _losses(two_processes)
  assert sorted(loss_one) == sorted(loss_two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([loss_two[s] for s in loss_one], list(loss_one.values()), rtol=1e-5)
  p1, p2 = _params(one_process), _params(two_processes)
  assert p1.keys() == p2.keys()
  for name in p1:
    np.testing.assert_allclose(p2[name], p1[name], atol=2e-5, err_msg=name)
  # Written once, by process 0, with the same values the 1-process run wrote.
  s1, s2 = (json.loads((w / "summary.json").read_text()) for w in (one_process, two_processes))
  assert s1["val"]["t2v/R@1"] == s2["val"]["t2v/R@1"] and s1["step"] == s2["step"] == STEPS
  assert len(_losses(two_processes)) == STEPS  # one metrics.jsonl row a step, not one per process


@pytest.mark.slow
def test_sigterm_to_every_process_saves_one_step_and_the_relaunch_is_bit_identical(two_processes, shards, compile_cache,
                                                                                   tmp_path):
  run = tmp_path / "run"
  args = ["clipvip_jax.train", *_train_args(run, shards, compile_cache)]
  proc = _launch(args)
  _wait_for(lambda: (run / "batches.jsonl").exists() and len(_batches(run)) >= 6, 300, "step 6")
  proc.send_signal(signal.SIGTERM)  # launch_local forwards it to both processes, as a scheduler would
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-5000:]
  saved = ckpt_lib.finished_steps(run / "checkpoints")
  stopped_at = max(saved)
  assert 6 <= stopped_at < STEPS, (saved, out[-3000:])
  assert f"preempted: saved step {stopped_at}" in out
  meta_steps = {json.loads((run / "checkpoints" / str(s) / "meta" / "metadata").read_text())["step"] for s in saved}
  assert meta_steps == set(saved)  # one checkpoint a step, written together by both processes

  # Resume that checkpoint on 1 process x 8 devices with 2 Grain workers: the next global batch is the one the
  # uninterrupted run saw.
  other = tmp_path / "other"
  shutil.copytree(run, other, ignore=shutil.ignore_patterns("*.lock"))
  assert cli.train_main(_train_args(other, shards, compile_cache, f"--config.total_steps={stopped_at + 1}",
                                    "--config.data.worker_count=2")) == 0
  assert _batches(other)[stopped_at + 1] == _batches(two_processes)[stopped_at + 1]

  # Relaunch on 2 processes: finishes bit-identically, having read the same batches.
  out = _run(args)
  assert f"resumed from" in out and f"at step {stopped_at}" in out
  assert _batches(run) == _batches(two_processes)
  reference, resumed = _params(two_processes), _params(run)
  for name in reference:
    np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_processes(one_process, shards, compile_cache, tmp_path):
  run = tmp_path / "run"
  assert cli.train_main(_train_args(run, shards, compile_cache, "--config.total_steps=8")) == 0
  _run(["clipvip_jax.train", *_train_args(run, shards, compile_cache, "--config.total_steps=10")])
  batches, reference = _batches(run), _batches(one_process)
  assert sorted(batches) == list(range(1, 11))
  assert all(batches[s] == reference[s] for s in batches)


@pytest.mark.slow
def test_evaluation_is_the_same_on_two_processes(one_process, tmp_path):
  mine = tmp_path / "one.json"
  assert cli.eval_main(["--checkpoint", str(one_process), "--split", "val", "--output", str(mine)]) == 0
  theirs = tmp_path / "two.json"
  _run(["clipvip_jax.eval", "--checkpoint", str(one_process), "--split", "val", "--output", str(theirs)])
  a, b = json.loads(mine.read_text()), json.loads(theirs.read_text())
  for key in a:
    if key != "seconds":
      assert a[key] == b[key], key
