"""Fault injection (issue 18): what a long run meets, and that each case ends in one sentence naming the file, step,
setting or process, a non-zero exit (or a stated recovery), and nothing earlier lost.

Damaged latest checkpoint (truncated data file, deleted params/_METADATA) -> the previous step, named; a second
trainer on a locked workdir; a stale lock; truncated shards; a full disk during a save and its leftover folder; a
changed model or batch size on resume; bad dtypes; a TorchScript look-alike; non-UTF-8 annotations; a corrupt
workdir config.json; over-long queries; the trainer's own lines on the terminal; build_shards and Ctrl-C.
The runs are the tiny config on synthetic shards, on one device.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import jax
import pytest
from conftest import synthetic_shards

from clipvip_jax.train import checkpoint as ckpt_lib
from clipvip_jax.train import cli, run_config, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4  # checkpoints at 2 and 4 (checkpoint.every=2, keep=2)


def _args(workdir, shards, *extra):
  return ["--config", "configs/tiny_test.py", "--workdir", str(workdir), f"--config.data.shard_dir={shards}",
          f"--config.total_steps={STEPS}", "--config.checkpoint.every=2", "--config.mesh=(1,1,1)",
          "--config.eval.split=", "--config.log_every=2", *extra]


def _error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if ": error: " in line or line.startswith("error: ")]


def _assert_one_sentence(err: str, *fragments: str) -> str:
  assert "Traceback" not in err, err[-3000:]
  errors = _error_lines(err)
  assert len(errors) == 1, err[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return synthetic_shards(tmp_path_factory, num_clips=32, seed=3, shard_size=8)


@pytest.fixture(scope="module")
def workdir(shards, compile_cache, tmp_path_factory):
  """A finished run with checkpoints at steps 2 and 4 (never modified: tests work on copies)."""
  run = tmp_path_factory.mktemp("run") / "run"
  assert cli.train_main(_args(run, shards, f"--config.compilation_cache_dir={compile_cache}")) == 0
  assert ckpt_lib.finished_steps(run / "checkpoints") == [2, 4]
  assert not (run / workdir_lock.LOCK_NAME).exists()  # released at the end
  return run


def _copy(workdir, tmp_path, name="copy"):
  target = tmp_path / name
  shutil.copytree(workdir, target)
  return target


def _lock_held_by(run: pathlib.Path, pid: int) -> workdir_lock.WorkdirLock:
  """The lock file a live trainer of pid `pid` on this host would have written."""
  lock = workdir_lock.WorkdirLock(run)
  record = {**lock._record(), "pid": pid, "pid_start": workdir_lock._start_time(pid)}  # pylint: disable=W0212
  lock.path.write_text(json.dumps(record))
  return lock


def _truncate_params(step_dir: pathlib.Path) -> None:
  data = max((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)
  os.truncate(data, data.stat().st_size // 2)


# ------------------------------------------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize("damage", ["truncated", "no_metadata"])
def test_eval_falls_back_to_the_previous_complete_checkpoint(workdir, tmp_path, capsys, damage):
  run = _copy(workdir, tmp_path)
  if damage == "truncated":
    _truncate_params(run / "checkpoints" / "4")
    expected = "params data cannot be read"
  else:
    (run / "checkpoints" / "4" / "params" / "_METADATA").unlink()
    expected = "params/_METADATA is missing"
  out = tmp_path / "result.json"
  assert cli.eval_main(["--checkpoint", str(run), "--split", "test", "--output", str(out)]) == 0
  err = capsys.readouterr().err
  assert f"damaged checkpoint step 4 ({expected}" in err and "using step 2 instead" in err, err
  assert json.loads(out.read_text())["step"] == 2
  assert (run / "checkpoints" / "4").is_dir()  # a reader never moves or deletes anything
  # Asked for by number, the damaged step is an error naming it.
  assert cli.eval_main(["--checkpoint", str(run), "--split", "test", "--which", "4"]) == 2
  _assert_one_sentence(capsys.readouterr().err, "checkpoint step 4", expected)


def test_encode_falls_back_too(workdir, tmp_path):
  run = _copy(workdir, tmp_path)
  (run / "checkpoints" / "4" / "params" / "_METADATA").unlink()
  texts = tmp_path / "q.txt"
  texts.write_text("a red square\n")
  proc = subprocess.run([sys.executable, "-m", "clipvip_jax.encode", "--checkpoint", str(run), "--texts",
                         str(texts), "--out", str(tmp_path / "emb"), "--quiet"], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.count("damaged checkpoint step 4 (params/_METADATA is missing)") == 1  # resolved twice, said once
  assert "(step 2)" in proc.stdout


def test_every_checkpoint_damaged_is_one_sentence(workdir, tmp_path, capsys):
  run = _copy(workdir, tmp_path)
  for step in (2, 4):
    (run / "checkpoints" / str(step) / "params" / "_METADATA").unlink()
  assert cli.eval_main(["--checkpoint", str(run), "--split", "test"]) == 2
  _assert_one_sentence(capsys.readouterr().err, "every checkpoint is damaged", "step 4", "step 2")


def test_train_resumes_from_the_previous_step_past_a_stale_lock_and_states_changes(workdir, shards, tmp_path,
                                                                                   compile_cache, capsys):
  """One resumed run for four faults: the latest checkpoint truncated, a lock left by a dead trainer, a changed
  batch size (resumable, stated), and the "resumed from" line, which must reach the terminal."""
  run = _copy(workdir, tmp_path)
  _truncate_params(run / "checkpoints" / "4")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (run / workdir_lock.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                        "started": time.time() - 60}))
  argv = _args(run, shards, "--config.data.batch_size=4", f"--config.compilation_cache_dir={compile_cache}")
  argv[argv.index(f"--config.total_steps={STEPS}")] = "--config.total_steps=6"
  assert cli.train_main(argv) == 0
  err = capsys.readouterr().err
  assert f"took over the lock of workdir {run} from pid {dead.pid}" in err, err
  assert "damaged checkpoint step 4 (params data cannot be read" in err and "resuming from step 2 instead" in err
  assert "data.batch_size 8 -> 4" in err and "total_steps 4 -> 6" in err
  assert "resumed from" in err and "at step 2" in err
  # The damaged step is kept aside, not deleted; the run saved step 4 again and finished.
  assert (run / ckpt_lib.DAMAGED_DIR / "4" / "params").is_dir()
  assert ckpt_lib.finished_steps(run / "checkpoints") == [4, 6]
  assert ckpt_lib.step_damage(run / "checkpoints" / "6") is None
  assert json.loads((run / "config.json").read_text())["data"]["batch_size"] == 4
  assert not (run / workdir_lock.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ lock and config


def test_second_trainer_on_a_locked_workdir_names_the_holder(workdir, shards, tmp_path, capsys):
  run = _copy(workdir, tmp_path)
  config_before = (run / "config.json").read_bytes()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    lock = _lock_held_by(run, holder.pid)
    assert cli.train_main(_args(run, shards)) == 2
    _assert_one_sentence(capsys.readouterr().err, f"workdir {run} is in use", f"pid {holder.pid}",
                         socket.gethostname(), workdir_lock.LOCK_NAME)
  finally:
    holder.kill()
    holder.wait()
  assert (run / "config.json").read_bytes() == config_before  # nothing rewritten
  assert json.loads(lock.path.read_text())["pid"] == holder.pid  # the holder's lock is left alone
  assert ckpt_lib.finished_steps(run / "checkpoints") == [2, 4]


def test_lock_from_another_host_is_taken_only_when_abandoned(tmp_path):
  lock = workdir_lock.WorkdirLock(tmp_path)
  lock.path.write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "started": time.time()}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on host elsewhere.example .* refreshed 0 s ago"):
    lock.acquire()
  # Untouched for longer than STALE_AFTER_S (that host's run died without releasing it): taken over, said so.
  old = time.time() - workdir_lock.STALE_AFTER_S - 60
  os.utime(lock.path, (old, old))
  reports = []
  lock.acquire(report=reports.append)
  assert len(reports) == 1
  assert reports[0].startswith(f"took over the lock of workdir {tmp_path} from pid 1 on host elsewhere.example")
  assert "whose lock was last refreshed 11 minutes ago" in reports[0]
  assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  lock.release()
  assert not lock.path.exists()
  with workdir_lock.WorkdirLock(tmp_path) as held:
    assert json.loads(held.path.read_text())["pid"] == os.getpid()
    other = subprocess.run([sys.executable, "-c", "from clipvip_jax.train.workdir_lock import WorkdirLock; "
                            f"WorkdirLock({str(tmp_path)!r}).acquire()"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode != 0 and f"in use by the training run of pid {os.getpid()}" in other.stderr
  assert not held.path.exists()


@pytest.mark.slow
def test_of_several_runs_taking_over_a_stale_lock_one_wins(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
  release = tmp_path / "release"
  script = ("import os, sys, time; from clipvip_jax.train.workdir_lock import WorkdirLock\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n  WorkdirLock(sys.argv[1]).acquire(report=lambda t: None)\nexcept Exception:\n  sys.exit(3)\n"
            "while not os.path.exists(sys.argv[3]):\n  time.sleep(0.05)\n")
  start = time.time() + 4  # all import first, then race
  procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(start), str(release)], cwd=REPO)
           for _ in range(4)]
  deadline = time.time() + 120
  while time.time() < deadline and sum(p.poll() is not None for p in procs) < 3:
    time.sleep(0.1)
  release.touch()  # the winner holds the lock until the others have given up
  codes = sorted(p.wait(timeout=60) for p in procs)
  assert codes == [0, 3, 3, 3]
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_lock_heartbeat_keeps_a_long_run_fresh(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with workdir_lock.WorkdirLock(tmp_path) as held:
    old = time.time() - 1000
    os.utime(held.path, (old, old))
    time.sleep(0.5)
    assert time.time() - held.path.stat().st_mtime < 100


def test_changed_model_cannot_resume_and_config_json_is_kept(workdir, shards, tmp_path, capsys):
  run = _copy(workdir, tmp_path)
  config_before = (run / "config.json").read_bytes()
  assert cli.train_main(_args(run, shards, "--config.model.clip.vision.width=48")) == 2
  _assert_one_sentence(capsys.readouterr().err, f"workdir {run} cannot resume", "(step 4)",
                       "model.clip.vision.width 32 -> 48")
  assert (run / "config.json").read_bytes() == config_before
  assert ckpt_lib.finished_steps(run / "checkpoints") == [2, 4]


def test_config_differences_classify_resumable_settings():
  saved = {"model": {"clip": {"vision": {"width": 32}}, "dtype": "float32"}, "optim": {"name": "adamw", "lr": 1e-3},
           "data": {"batch_size": 8}}
  current = {"model": {"clip": {"vision": {"width": 32}}, "dtype": "bfloat16"}, "optim": {"name": "adamw", "lr": 1e-4},
             "data": {"batch_size": 16}}
  diffs = run_config.differences(saved, current)
  assert [d[0] for d in diffs] == ["data.batch_size", "model.dtype", "optim.lr"]
  assert not any(run_config._fixed(d[0]) for d in diffs)  # pylint: disable=protected-access
  assert run_config._fixed("optim.name")  # pylint: disable=protected-access
  assert run_config._fixed("model.clip.vision.width")  # pylint: disable=protected-access
  # scan_layers keeps the parameter names and shapes (layers.Encoder): runtime at init and on resume alike.
  assert not run_config._fixed("model.scan_layers")  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------ shards


def test_truncated_shard_is_named_by_train_eval_encode_and_preview(workdir, shards, tmp_path, capsys):
  bad = tmp_path / "shards"
  shutil.copytree(shards, bad)
  for name in ("train-00001-of-00003.array_record", "test-00000-of-00001.array_record"):
    os.truncate(bad / name, (bad / name).stat().st_size // 2 + 100)
  assert cli.train_main(_args(tmp_path / "run", bad)) == 2
  _assert_one_sentence(capsys.readouterr().err, f"shard file {bad / 'train-00001-of-00003.array_record'} is "
                       "damaged or truncated")
  assert not (tmp_path / "run").exists()  # the shards are checked before anything is written
  assert cli.eval_main(["--checkpoint", str(workdir), "--split", "test", f"--config.data.shard_dir={bad}",
                        "--output", str(tmp_path / "r.json")]) == 2
  _assert_one_sentence(capsys.readouterr().err, "test-00000-of-00001.array_record is damaged")
  from data_pipelines import preview
  assert preview.main([str(bad), "--out", ""]) == 2
  assert "train-00001-of-00003.array_record is damaged" in capsys.readouterr().err
  proc = subprocess.run([sys.executable, "-m", "clipvip_jax.encode", "--checkpoint", str(workdir), "--shards",
                         str(bad), "--split", "train", "--out", str(tmp_path / "emb"), "--quiet"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  _assert_one_sentence(proc.stderr, "train-00001-of-00003.array_record is damaged")
  assert not (tmp_path / "emb").exists()


# ------------------------------------------------------------------------------------------ full disk


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_sentence_and_the_leftover_is_removed(workdir, shards, tmp_path):
  """A file-size limit stands in for a full disk (EFBIG instead of ENOSPC, through the same write path): a resumed
  run's save of step 6 fails. One sentence; steps 2 and 4 intact; the next start removes the unfinished folder."""
  run = _copy(workdir, tmp_path)
  # The limit is set in a launcher that then execs the trainer (no preexec_fn: this process runs JAX's threads).
  launcher = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
              "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
  env = {**os.environ, "XLA_FLAGS": ""}
  argv = _args(run, shards)
  argv[argv.index(f"--config.total_steps={STEPS}")] = "--config.total_steps=6"
  proc = subprocess.run([sys.executable, "-c", launcher, "-m", "clipvip_jax.train", *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  _assert_one_sentence(proc.stderr, "saving checkpoint step 6", str(run / "checkpoints"), "File too large")
  assert len(proc.stderr.splitlines()) < 15, proc.stderr[-3000:]
  assert "resumed from" in proc.stderr
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6.orbax-checkpoint-tmp"]
  assert ckpt_lib.step_damage(run / "checkpoints" / "4") is None  # nothing earlier lost
  assert not (run / workdir_lock.LOCK_NAME).exists()
  reports = []
  ckpt_lib.remove_dead_saves(run / "checkpoints", reports.append)
  assert ckpt_lib.finished_steps(run / "checkpoints") == [2, 4] and "6.orbax-checkpoint-tmp" in reports[0]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


def test_checkpointer_removes_dead_saves_at_start(workdir, tmp_path, monkeypatch):
  run = _copy(workdir, tmp_path)
  shutil.copytree(run / "checkpoints" / "4", run / "checkpoints" / "6.orbax-checkpoint-tmp")
  reports = []
  monkeypatch.setattr(ckpt_lib.log, "warning", reports.append)
  checkpointer = ckpt_lib.Checkpointer(run, keep=2)
  checkpointer.close()
  assert len(reports) == 1 and "removed 1 unfinished checkpoint folder(s)" in reports[0]
  assert "6.orbax-checkpoint-tmp" in reports[0]
  assert ckpt_lib.finished_steps(run / "checkpoints") == [2, 4]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


# ------------------------------------------------------------------------------------------ bad values and files


def test_bad_dtypes_are_one_sentence(workdir, shards, tmp_path, capsys):
  assert cli.train_main(_args(tmp_path / "run", shards, "--config.model.dtype=float33")) == 2
  _assert_one_sentence(capsys.readouterr().err, "config.model.dtype = 'float33'")
  assert not (tmp_path / "run").exists()
  assert cli.eval_main(["--checkpoint", str(workdir), "--split", "test", "--dtype", "float33"]) == 2
  _assert_one_sentence(capsys.readouterr().err, "--dtype float33")


def test_corrupt_workdir_config_json_is_named(workdir, tmp_path, capsys):
  run = _copy(workdir, tmp_path)
  (run / "config.json").write_text('{"model": ')
  assert cli.eval_main(["--checkpoint", str(run), "--split", "test"]) == 2
  _assert_one_sentence(capsys.readouterr().err, f"{run / 'config.json'} is not valid JSON")
  (run / "config.json").write_bytes(b"\xff\xfe{}")
  assert cli.eval_main(["--checkpoint", str(run), "--split", "test"]) == 2
  _assert_one_sentence(capsys.readouterr().err, "config.json is not UTF-8")
  shutil.copy(workdir / "config.json", run / "config.json")
  (run / ckpt_lib.BEST_FILE).write_text("{")
  assert cli.eval_main(["--checkpoint", str(run), "--split", "test", "--which", "best"]) == 2
  _assert_one_sentence(capsys.readouterr().err, f"{run / ckpt_lib.BEST_FILE} is not a readable best-checkpoint")


def test_torchscript_lookalike_and_trust_pickle_messages(tmp_path, capsys):
  fake = tmp_path / "fake.pt"
  with zipfile.ZipFile(fake, "w") as zf:
    zf.writestr("archive/code/__torch__.py", "not code")
    zf.writestr("archive/constants.pkl", b"not a pickle")
  from clipvip_jax.convert.__main__ import main as convert_main
  assert convert_main([str(fake), "--out", str(tmp_path / "out")]) == 2
  _assert_one_sentence(capsys.readouterr().err, f"{fake} looks like a TorchScript archive but does not load")
  assert not (tmp_path / "out").exists()
  import torch
  pickled = tmp_path / "objects.pt"
  torch.save({"w": torch.zeros(2), "when": zipfile.ZipInfo("x")}, pickled)  # a non-tensor object
  from clipvip_jax.convert.common import load_state_dict
  with pytest.raises(ValueError) as info:
    load_state_dict(pickled)
  assert "CLI: --trust-pickle" not in str(info.value)  # train and eval have no such flag
  assert "python -m clipvip_jax.convert" in str(info.value) and "--trust-pickle" in str(info.value)


def test_non_utf8_annotation_files_are_named(tmp_path, capsys):
  from data_pipelines import annotations, build_shards
  latin1 = tmp_path / "ann.jsonl"
  latin1.write_bytes('{"clip_id": "a", "video": "v.mp4", "captions": ["café"]}\n'.encode("latin-1"))
  (tmp_path / "videos").mkdir()
  assert build_shards.main(["--videos", str(tmp_path / "videos"), "--annotations", str(latin1), "--out",
                            str(tmp_path / "out"), "--quiet"]) == 2
  _assert_one_sentence(capsys.readouterr().err, f"{latin1}: not UTF-8 text (byte 0xe9")
  ids = tmp_path / "list.txt"
  ids.write_bytes(b"video1\nvid\xe9o2\n")
  with pytest.raises(annotations.AnnotationError, match=f"{ids}: not UTF-8 text"):
    annotations.read_id_list(ids)


def test_long_queries_are_stated_and_absurd_ones_refused():
  from clipvip_jax.tokenizer import MAX_QUERY_CHARS, truncation_notes
  assert truncation_notes(["a red square moves left"], 16) == []
  notes = truncation_notes(["short", "word " * 40], 16)
  assert len(notes) == 1 and notes[0].startswith("query 2 has 40 tokens; only the first 14 are used")
  with pytest.raises(ValueError, match=f"query 1 is {MAX_QUERY_CHARS + 1} characters long"):
    truncation_notes(["x" * (MAX_QUERY_CHARS + 1)], 77)


def test_preemption_message_reaches_the_terminal(shards, compile_cache, tmp_path, capsys):
  from clipvip_jax.train import logging as run_logging
  from clipvip_jax.train import trainer
  config = cli.config_from_args("configs/tiny_test.py", [])
  config.data.shard_dir, config.total_steps, config.mesh = str(shards), STEPS, (1, 1, 1)
  config.eval.split, config.compilation_cache_dir = "", str(compile_cache)
  run_logging.log_to_terminal()

  def preempt(step, batch):  # pylint: disable=unused-argument
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  summary = trainer.train(config, tmp_path / "run", hooks=trainer.Hooks(on_step=preempt))
  assert summary["preempted"]
  assert f"preempted: saved step {summary['step']}" in capsys.readouterr().err


def _tiny_config(shards, compile_cache, steps=STEPS):
  config = cli.config_from_args("configs/tiny_test.py", [])
  config.data.shard_dir, config.total_steps, config.mesh = str(shards), steps, (1, 1, 1)
  config.eval.split, config.compilation_cache_dir = "", str(compile_cache)
  return config


def test_ctrl_c_saves_like_sigterm_and_the_run_resumes(shards, compile_cache, tmp_path, capsys):
  from clipvip_jax.train import logging as run_logging
  from clipvip_jax.train import trainer
  run_logging.log_to_terminal()

  def interrupt(step, batch):  # pylint: disable=unused-argument
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)

  before = signal.getsignal(signal.SIGINT)
  summary = trainer.train(_tiny_config(shards, compile_cache), tmp_path / "run",
                          hooks=trainer.Hooks(on_step=interrupt))
  err = capsys.readouterr().err
  assert summary["preempted"] and summary["step"] < STEPS
  assert "Ctrl-C again to stop at once" in err and f"preempted: saved step {summary['step']}" in err
  assert ckpt_lib.finished_steps(tmp_path / "run" / "checkpoints") == [summary["step"]]
  assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone
  resumed = trainer.train(_tiny_config(shards, compile_cache), tmp_path / "run")
  assert resumed["step"] == STEPS and not resumed["preempted"]


def test_a_second_ctrl_c_stops_at_once_without_saving(shards, compile_cache, tmp_path):
  from clipvip_jax.train import trainer

  def interrupt_twice(step, batch):  # pylint: disable=unused-argument
    if step == 1:  # two Ctrl-C before the step boundary where the first would have saved
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(KeyboardInterrupt):
    trainer.train(_tiny_config(shards, compile_cache, steps=50), tmp_path / "run",
                  hooks=trainer.Hooks(on_step=interrupt_twice))
  assert ckpt_lib.finished_steps(tmp_path / "run" / "checkpoints") == []  # nothing half-saved either
  assert not (tmp_path / "run" / workdir_lock.LOCK_NAME).exists()  # the lock is released on the way out


# ------------------------------------------------------------------------------------------ build_shards Ctrl-C


# A Python started as from a terminal: SIGINT at its default and unblocked, whatever this test process inherited or
# was left with by the tests before it (an ignored or blocked SIGINT is inherited across exec, and a command would
# then rightly not answer Ctrl-C). Followed by the interpreter's arguments.
AS_FROM_TERMINAL = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


def test_a_ctrl_c_while_the_worker_pool_starts_is_not_lost():
  """build_shards' parent blocks SIGINT (it used to ignore it) while its spawn pool (data_pipelines.worker_pool)
  starts, so that the workers are born deaf to it: a Ctrl-C in that window still stops the parent. The pool's
  start is replaced by one that receives the Ctrl-C; in a process of its own, so the signal stays out of pytest."""
  code = """
import multiprocessing, os, signal, time
from data_pipelines import worker_pool
context = multiprocessing.get_context("spawn")
context.Pool = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT) or "pool"
try:
  pool = worker_pool.spawn_pool(2)
  for _ in range(200):
    time.sleep(0.001)
  print("lost", pool)
except KeyboardInterrupt:
  print("interrupted", signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set())
"""
  r = subprocess.run(AS_FROM_TERMINAL + ["-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["interrupted", "True"], r.stdout  # and the parent's signal mask is restored


def test_the_pools_workers_are_born_with_sigint_blocked():
  """The workers must not answer a Ctrl-C even while they import (before their initializer ignores it): they start
  with SIGINT blocked, inherited from the parent's mask while the pool starts. Starting the pool's first lock
  launches multiprocessing's resource tracker, which unblocks SIGINT in the calling thread; before build_shards
  started the tracker first, every worker started with nothing blocked (a Ctrl-C during their imports printed a
  traceback). In a fresh process, where no tracker runs yet; each worker's mask read from /proc at once."""
  code = """
import signal
from data_pipelines import worker_pool
pool = worker_pool.spawn_pool(2)
for worker in pool._pool:
  status = open(f"/proc/{worker.pid}/status").read()
  blocked = int(status.split("SigBlk:")[1].split()[0], 16)
  print(bool(blocked & (1 << (signal.SIGINT - 1))))
print(signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set())
pool.terminate()
"""
  if not pathlib.Path("/proc/self/status").exists():
    pytest.skip("reads signal masks from /proc (Linux)")
  r = subprocess.run(AS_FROM_TERMINAL + ["-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["True", "True", "True"], r.stdout  # both workers; the parent's mask restored


@pytest.mark.slow
def test_build_shards_ctrl_c_is_one_line_and_the_rerun_finishes(tmp_path):
  import numpy as np
  from PIL import Image
  videos = tmp_path / "videos"
  lines = []
  for clip in range(120):
    folder = videos / f"clip{clip}"
    folder.mkdir(parents=True)
    for i in range(8):
      Image.fromarray(np.full((96, 96, 3), (clip * 2 + i) % 255, np.uint8)).save(folder / f"{i:03d}.png")
    lines.append(json.dumps({"clip_id": f"c{clip}", "video": f"clip{clip}", "captions": ["a flat colour"]}))
  ann = tmp_path / "ann.jsonl"
  ann.write_text("\n".join(lines) + "\n")
  cmd = [sys.executable, "-m", "data_pipelines.build_shards", "--videos", str(videos), "--annotations", str(ann),
         "--out", str(tmp_path / "out"), "--shard-size", "1", "--workers", "2", "--quiet"]
  proc = subprocess.Popen(AS_FROM_TERMINAL + cmd[1:], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  # Ctrl-C once the first shard is finished: the workers run (they ignore SIGINT) and ~119 shards remain. (A fixed
  # sleep after the plan sometimes landed before the pool existed, or after the last shard on a loaded machine.)
  deadline = time.time() + 120
  while time.time() < deadline and not any((tmp_path / "out").glob("train-*.array_record")):
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: the whole process group
  out, err = proc.communicate(timeout=120)
  if proc.returncode == 0:
    pytest.skip(f"the build finished before Ctrl-C arrived (SIGINT here: {signal.getsignal(signal.SIGINT)})")
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  assert err.strip().splitlines() == [f"build_shards: interrupted; finished shards are kept in {tmp_path / 'out'}: "
                                      "run the same command again to resume"]
  rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0 and "wrote 120 records" in rerun.stdout, rerun.stderr[-3000:]


# ------------------------------------------------------------------------------------------ several processes

_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
from clipvip_jax.train import checkpoint as ckpt_lib, workdir_lock
out = {"process": jax.process_index()}
try:
  lock = workdir_lock.WorkdirLock(sys.argv[3]).acquire(report=lambda t: print("REPORT", t, flush=True))
  checkpointer = ckpt_lib.Checkpointer(sys.argv[3], keep=2)
  out["step"] = checkpointer.restorable_step(report=lambda t: print("REPORT", t, flush=True))
  checkpointer.close()
  lock.release()
except Exception as e:
  out["error"] = str(e)
print("RESULT", json.dumps(out), flush=True)
"""


def _two_processes(workdir):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": ""}
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port), str(workdir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  results = [json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
             if line.startswith("RESULT ")]
  assert len(results) == 2, outputs
  return sorted(results, key=lambda r: r["process"]), outputs


@pytest.mark.slow
def test_two_processes_share_the_lock_and_the_fallback(workdir, tmp_path):
  """One run on two JAX processes (CPU, gloo): process 0 takes the lock and checks the checkpoints, both resume
  from the same step; with the workdir locked by another live run, both processes fail, process 0 naming it."""
  run = _copy(workdir, tmp_path)
  _truncate_params(run / "checkpoints" / "4")
  results, outputs = _two_processes(run)
  assert [r.get("step") for r in results] == [2, 2], results
  assert "REPORT damaged checkpoint step 4" in outputs[0] and "REPORT" not in outputs[1]
  assert (run / ckpt_lib.DAMAGED_DIR / "4").is_dir() and not (run / workdir_lock.LOCK_NAME).exists()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
  try:
    lock = _lock_held_by(run, holder.pid)
    results, _ = _two_processes(run)
  finally:
    holder.kill()
    holder.wait()
  assert f"in use by the training run of pid {holder.pid}" in results[0]["error"]
  assert "in use by another training run (process 0 names it)" in results[1]["error"]
