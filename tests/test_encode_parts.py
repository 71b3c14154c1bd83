"""encode at scale: batches split over 8 simulated devices, work in parts shared by processes, a killed encode
resumed part by part, and bad input (index from another model, float16 index and a model of another width)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import retrieval_helpers as rh
from retrieval_helpers import checkpoint, model, shards  # noqa: F401 (pytest fixtures)
from clipvip_jax import encode
from clipvip_jax import search as search_command
from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.retrieval import indexer
from clipvip_jax.retrieval.index import read_index

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(model, shards):
  return indexer.ShardClips(shards, "train", model.recipe)  # 16 clips, read once for every test here


def _meta(model, inputs):
  return {"kind": model.kind, "checkpoint": model.checkpoint, "step": None, "modality": inputs.modality}


def _build(model, inputs, out, **options):
  return indexer.build_index(model, inputs, out, meta=_meta(model, inputs), progress=False, **options)


@pytest.fixture(scope="module")
def reference(model, clips, tmp_path_factory):
  """The whole split on one device, one process, in parts of 5 clips (4 parts, the last one short)."""
  out = tmp_path_factory.mktemp("ref") / "index"
  _build(model, clips, out, batch_size=4, part_size=5, devices=jax.local_devices()[:1])
  return read_index(out)


def _same(index, reference):
  assert index.ids == reference.ids
  assert [index.captions(r) for r in range(index.count)] == [reference.captions(r) for r in range(index.count)]
  np.testing.assert_allclose(index.embeddings(), reference.embeddings(), atol=2e-5)


def test_eight_devices_give_the_one_device_index(model, clips, reference, tmp_path):
  assert jax.local_device_count() == 8, "run the tests with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  out = _build(model, clips, tmp_path / "index", batch_size=4, part_size=5)  # batch rounded up to 8
  _same(read_index(out), reference)
  assert [p.rows for p in read_index(out).parts] == [5, 5, 5, 1]


def test_processes_share_the_parts_and_give_the_same_index(model, clips, reference, tmp_path):
  """Two processes simulated in turn: each encodes its parts (0, 2 and 1, 3); the last to finish writes the index."""
  written = []
  assert _build(model, clips, tmp_path / "index", batch_size=4, part_size=5, process_index=0, process_count=2,
                after_part=written.append) is None
  assert written == ["part-00000", "part-00002"] and not (tmp_path / "index").exists()
  assert _build(model, clips, tmp_path / "index", batch_size=4, part_size=5, process_index=1, process_count=2,
                after_part=written.append) == tmp_path / "index"
  assert written[2:] == ["part-00001", "part-00003"]
  _same(read_index(tmp_path / "index"), reference)


class Killed(Exception):
  pass


def test_a_killed_encode_resumes_and_re_encodes_only_unfinished_parts(model, clips, reference, tmp_path):
  out = tmp_path / "index"

  def kill_after_three(name):
    if name == "part-00002":
      raise Killed

  with pytest.raises(Killed):
    _build(model, clips, out, batch_size=4, part_size=5, after_part=kill_after_three)
  staging = indexer.staging_dir(out)
  assert not out.exists() and sorted(p.name for p in (staging / "parts").iterdir()) == \
      ["part-00000", "part-00001", "part-00002"]
  shutil.rmtree(staging / "parts" / "part-00001")  # a part lost (or never renamed into place) is redone too
  redone = []
  assert _build(model, clips, out, batch_size=4, part_size=5, after_part=redone.append) == out
  assert redone == ["part-00001", "part-00003"]
  assert not staging.exists()
  _same(read_index(out), reference)


def test_a_relaunch_with_other_arguments_is_refused_unless_forced(model, clips, tmp_path):
  out = tmp_path / "index"

  def kill(name):
    raise Killed

  with pytest.raises(Killed):
    _build(model, clips, out, batch_size=4, part_size=5, after_part=kill)
  with pytest.raises(UsageError, match=r"holds an unfinished encode with other arguments \(part_size differ\); "
                                       "re-run it as it was, or pass --force to start over"):
    _build(model, clips, out, batch_size=4, part_size=8)
  redone = []
  _build(model, clips, out, batch_size=4, part_size=8, force=True, after_part=redone.append)
  assert redone == ["part-00000", "part-00001"] and read_index(out).count == 16


def test_float16_texts_index_and_bad_searches(checkpoint, model, shards, tmp_path, capsys):
  texts = tmp_path / "texts.txt"
  texts.write_text("".join(f"text number {i}\n" for i in range(7)), encoding="utf-8")
  out = tmp_path / "texts"
  assert encode.main(["--checkpoint", str(checkpoint), "--texts", str(texts), "--out", str(out), "--quiet",
                      "--dtype", "float16", "--part-size", "3", "--batch-size", "2"]) == 0
  index = read_index(out)
  assert (index.dtype, index.count, len(index.parts)) == ("float16", 7, 3)
  ids, mask = model.tokenize(index.ids)
  np.testing.assert_allclose(index.embeddings(), np.asarray(model.encode_text(ids, mask)), atol=2e-3)
  # A float16 video index searched with a model of another width; a clipvip index searched with a clip2video
  # model: one sentence each, exit 2, nothing written.
  video = tmp_path / "video"
  assert encode.main(["--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "test", "--out",
                      str(video), "--quiet", "--dtype", "float16"]) == 0
  other = rh.write_tiny_clipvip(tmp_path / "clipvip16", projection_dim=16)
  c2v = rh.write_tiny_clip2video(tmp_path / "clip2video")
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  for ckpt, expected in ((other, "holds 32-dim embeddings but checkpoint"),
                         (c2v, "was built with a clipvip model but checkpoint")):
    with pytest.raises(SystemExit) as exc:
      search_command.main(["--index", str(video), "q", "--checkpoint", str(ckpt)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow  # two JAX processes start and compile (about a minute on 2 cores)
def test_two_processes_of_four_devices_give_the_one_process_index(checkpoint, shards, tmp_path):
  """launch_local: 2 processes x 4 CPU devices (gloo), against 1 process of 8 devices, through the command."""
  common = ["--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "train", "--part-size", "3",
            "--batch-size", "4", "--quiet"]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  one = subprocess.run([sys.executable, "-m", "clipvip_jax.encode", *common, "--out", str(tmp_path / "one")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run([sys.executable, "-m", "clipvip_jax.launch_local", "--processes", "2",
                        "--devices-per-process", "4", "--", "python", "-m", "clipvip_jax.encode", *common,
                        "--out", str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
  _same(read_index(tmp_path / "two"), read_index(tmp_path / "one"))


# ------------------------------------------------------------------------------------------ issue 27: --out lock


def test_a_second_encode_into_the_same_out_is_refused_naming_the_holder(checkpoint, model, clips, tmp_path, capsys):
  import json
  import socket
  from clipvip_jax.train import workdir_lock
  out = tmp_path / "index"
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    lock = indexer.encode_lock(out)
    lock.path.write_text(json.dumps({**lock._record(), "pid": holder.pid,  # pylint: disable=protected-access
                                     "pid_start": workdir_lock._start_time(holder.pid)}))  # pylint: disable=W0212
    with pytest.raises(UsageError, match=f"--out {out} is in use by the encode of pid {holder.pid} on host "
                                         f"{socket.gethostname()}"):
      _build(model, clips, out, batch_size=4, part_size=5)
    with pytest.raises(SystemExit) as exc:
      encode.main(["--checkpoint", str(checkpoint), "--texts", str(_texts(tmp_path)), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0] and "use another --out" in err[0]
    assert not out.exists() and not indexer.staging_dir(out).exists()  # nothing written
    # search while that encode has written some parts: it says so, and who is writing
    indexer.staging_dir(out).mkdir()
    with pytest.raises(SystemExit):
      search_command.main(["--index", str(out), "q"])
    assert f"{out} is not an index yet: the encode of pid {holder.pid}" in capsys.readouterr().err
    indexer.staging_dir(out).rmdir()
  finally:
    holder.kill()
    holder.wait()
  # The holder died: its lock is taken over, and the encode goes on.
  assert _build(model, clips, out, batch_size=4, part_size=8) == out and not lock.path.exists()


def _texts(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "texts.txt"
  path.write_text("one\ntwo\nthree\n", encoding="utf-8")
  return path


def test_leftovers_of_dead_encodes_are_cleaned_never_published(model, clips, reference, tmp_path):
  out = tmp_path / "index"

  def kill(name):
    if name == "part-00001":
      raise Killed

  with pytest.raises(Killed):
    _build(model, clips, out, batch_size=4, part_size=5, after_part=kill)
  staging = indexer.staging_dir(out)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  leftovers = [staging / "parts" / f".part-00002.tmp-{dead.pid}", staging / f".thumbnails.tmp-{dead.pid}",
               tmp_path / f".index.old-{dead.pid}", tmp_path / f".index.tmp-{dead.pid}"]
  for path in leftovers:
    path.mkdir()
    (path / "junk").write_text("x")
  (staging / f".encode.json.tmp-{dead.pid}").write_text("{")
  live = tmp_path / f".index.old-{os.getpid()}"  # a live process's: left alone
  live.mkdir()
  assert _build(model, clips, out, batch_size=4, part_size=5) == out
  assert not any(p.exists() for p in leftovers) and live.exists()
  assert sorted(p.name for p in out.rglob("*") if p.name.startswith(".")) == []  # nothing hidden published
  _same(read_index(out), reference)


def test_an_unfinished_encode_is_named_with_the_command_that_finishes_it(model, clips, tmp_path, capsys):
  from clipvip_jax import index as index_command
  from clipvip_jax.retrieval import serve_command
  out = tmp_path / "index"

  def kill(name):
    raise Killed

  with pytest.raises(Killed):
    _build(model, clips, out, batch_size=4, part_size=5, after_part=kill,
           command="python -m clipvip_jax.encode --shards S --out index")
  for main in (lambda: search_command.main(["--index", str(out), "q"]),
               lambda: serve_command.main(["--index", str(out), "--port", "0"]),
               lambda: index_command.main(["info", str(out)])):
    with pytest.raises(SystemExit) as exc:
      main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert f"{out} is not an index yet: an encode into it was interrupted" in err[0]
    assert "finish it with: python -m clipvip_jax.encode --shards S --out index" in err[0]


class NonFinite:
  """Inputs whose model gives NaN for some rows (what a broken model or input could do)."""
  modality, unit = "text", "text"

  def __init__(self, n: int, bad: set[int]):
    self.n, self.bad = n, bad

  def __len__(self):
    return self.n

  def fingerprint(self):
    return f"nonfinite-{self.n}-{sorted(self.bad)}"

  def encode(self, encode_fn, start, stop, batch_size, dims, bar):
    rows = np.ones((stop - start, dims), np.float32)
    for i in range(start, stop):
      if i in self.bad:
        rows[i - start, i % dims] = np.nan if i % 2 else np.inf
    return indexer.PartRows(rows, [f"text {i}" for i in range(start, stop)], None, [])


def test_non_finite_rows_are_refused_at_encode_and_listed(model, tmp_path):
  out = tmp_path / "index"
  inputs = NonFinite(7, {1, 4})
  assert indexer.build_index(model, inputs, out, meta={**_meta(model, inputs)}, part_size=3, progress=False) == out
  index = read_index(out)
  assert index.ids == ["text 0", "text 2", "text 3", "text 5", "text 6"]
  assert np.isfinite(index.embeddings()).all()
  assert [(s["id"], s["reason"]) for s in index.skipped()] == [("text 1", indexer.NON_FINITE_REASON),
                                                                ("text 4", indexer.NON_FINITE_REASON)]


KILL_IN_THUMBNAILS = """
import os, signal, sys
from clipvip_jax.retrieval import thumbnails
made = [0]
make_strip = thumbnails.make_strip
def dying(*args, **kwargs):
  made[0] += 1
  if made[0] == 2:
    os.kill(os.getpid(), signal.SIGKILL)  # mid-thumbnails: after the first strip is written
  return make_strip(*args, **kwargs)
thumbnails.make_strip = dying
from clipvip_jax import encode
sys.exit(encode.main(sys.argv[1:]))
"""


def test_a_kill_while_thumbnails_are_written_is_finished_by_a_relaunch(checkpoint, shards, tmp_path, capsys):
  """A real SIGKILL in the middle of the thumbnails: no index is published, its .thumbnails.tmp-PID is left in the
  staging folder; search names the unfinished encode; the relaunch cleans it and finishes the same index as an
  uninterrupted encode, thumbnails included."""
  from clipvip_jax.retrieval import thumbnails
  args = ["--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "test", "--quiet", "--part-size", "2"]
  out = tmp_path / "killed"
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  killed = subprocess.run([sys.executable, "-c", KILL_IN_THUMBNAILS, *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -9, killed.stderr[-2000:]
  staging = indexer.staging_dir(out)
  assert not out.exists() and any(p.name.startswith(".thumbnails.tmp-") for p in staging.iterdir())
  with pytest.raises(SystemExit):
    search_command.main(["--index", str(out), "a query"])
  err = capsys.readouterr().err
  assert "was interrupted" in err and "finish it with: python -m clipvip_jax.encode --checkpoint" in err
  assert encode.main([*args, "--out", str(out)]) == 0
  assert encode.main([*args, "--out", str(tmp_path / "whole")]) == 0
  killed_index, whole = read_index(out), read_index(tmp_path / "whole")
  _same(killed_index, whole)
  strips = thumbnails.Thumbnails(out, killed_index.count), thumbnails.Thumbnails(tmp_path / "whole", whole.count)
  assert all(strips[0].strip(r) == strips[1].strip(r) and strips[0].has(r) for r in range(whole.count))
  assert not staging.exists() and not [p for p in out.rglob(".*")]
