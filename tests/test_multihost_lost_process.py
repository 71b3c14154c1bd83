"""Several JAX processes (issue 13), continued from tests/test_multihost.py: a SIGKILLed process makes the other
exit with one sentence, and the relaunch resumes from the last complete checkpoint. A file of its own, so that
pytest-xdist runs it beside test_multihost.py's runs (it shares none of their module fixtures).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import synthetic_shards
from test_multihost import REPO, _train_args, _wait_for

from clipvip_jax.runtime import launch_local
from clipvip_jax.train import checkpoint as ckpt_lib
from clipvip_jax.train import cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return synthetic_shards(tmp_path_factory, num_clips=64, seed=5, shard_size=16)


@pytest.mark.slow
def test_sigkill_of_one_process_ends_the_other_with_one_sentence(shards, compile_cache, tmp_path):
  run = tmp_path / "run"
  args = [sys.executable, "-m", "clipvip_jax.train",
          *_train_args(run, shards, compile_cache, "--config.total_steps=64")]
  port = launch_local.free_port()
  procs = []
  for index in range(2):
    env = launch_local.process_env(dict(os.environ), index, 2, 2, port)
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True))
  try:
    _wait_for(lambda: 4 in ckpt_lib.finished_steps(run / "checkpoints") if (run / "checkpoints").exists()
              else False, 300, "the checkpoint of step 4")
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.time()
    out, err = procs[0].communicate(timeout=150)
    assert time.time() - killed_at < 120
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
  assert procs[0].returncode != 0
  assert "Traceback" not in err and "Check failure stack trace" not in err, err[-3000:]
  sentences = [line for line in err.splitlines() if line.startswith("clipvip_jax: train")]
  # Which message depends on what notices first: the runtime's heartbeat (names the lost process) or a collective
  # whose peer closed its connection.
  assert len(sentences) == 1, err[-3000:]
  assert ("process 1 stopped responding" in sentences[0]
          or "another process of the job was lost (a collective failed" in sentences[0]), sentences[0]
  last = max(ckpt_lib.finished_steps(run / "checkpoints"))
  # The relaunch (here on one process) resumes from the last complete checkpoint; the dead run's lock is stale.
  assert cli.train_main(_train_args(run, shards, compile_cache, f"--config.total_steps={last + 2}")) == 0
  assert max(ckpt_lib.finished_steps(run / "checkpoints")) == last + 2
