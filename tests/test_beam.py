"""The Beam-generated `video_text_corpus` builder, run with Beam's local DirectRunner on a small corpus in the
build_shards JSON-lines format: the clips come back through tfds.data_source with all their texts and
segments, and every input that cannot be written is reported in skipped-<split>-*.jsonl, never fatal."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("CI", "").lower() == "true":
  import apache_beam  # noqa: F401 — CI must run the Beam build, never skip it
else:
  pytest.importorskip("apache_beam", reason="apache-beam is not installed (pip install apache-beam)")

import tensorflow_datasets as tfds  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from data_pipelines import tfds as clip_tfds  # noqa: E402
from data_pipelines.records import decode_record  # noqa: E402
from data_pipelines.video_io import decode_jpeg  # noqa: E402
from conftest import tree_state  # noqa: E402
from test_tfds_builders import SOURCE_FPS, write_video  # noqa: E402


def read_split(data_dir, name, split):
  source = clip_tfds.TfdsRecordSource(f"video_text_corpus/{name}", split, data_dir=str(data_dir))
  return {r.clip_id: r for r in (decode_record(source[i]) for i in range(len(source)))}


def skipped_entries(dataset_dir, split):
  entries = []
  for path in sorted(glob.glob(os.path.join(dataset_dir, f"skipped-{split}-*.jsonl"))):
    with open(path) as f:
      entries += [json.loads(line) for line in f]
  return entries


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Four good clips (one a segment), a corrupt video, a missing one, a duplicate id, a clip of a split the
  config does not build, and a line that is not JSON."""
  root = tmp_path_factory.mktemp("corpus")
  for i in range(3):
    write_video(root / "videos" / f"v{i}.mp4", 40 + 60 * i)
  (root / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 20)
  lines = [
      {"clip_id": "c0", "video": "v0.mp4", "captions": [], "subtitle": "asr zero", "caption": "ofa zero"},
      {"clip_id": "c1", "video": "v1.mp4", "captions": ["one", "uno"], "split": "train"},
      {"clip_id": "c2", "video": "v2.mp4", "captions": ["two"], "start": 0.4, "end": 0.8, "split": "val"},
      {"clip_id": "c3", "video": "v0.mp4", "captions": ["zero again"], "split": "val"},
      {"clip_id": "bad", "video": "corrupt.mp4", "captions": ["never"]},
      {"clip_id": "gone", "video": "missing.mp4", "captions": ["never"]},
      {"clip_id": "c1", "video": "v2.mp4", "captions": ["duplicate of c1"]},
      {"clip_id": "t0", "video": "v1.mp4", "captions": ["a test clip"], "split": "test"},
  ]
  with open(root / "ann.jsonl", "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
    f.write("{this is not json\n")
  return root


@pytest.fixture(scope="module")
def built(corpus):
  """The corpus built through the command line (`python -m`, as a user runs it) with the DirectRunner."""
  data_dir = corpus / "tfds"
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.tfds.build_corpus", "--name", "tiny", "--annotations",
       str(corpus / "ann.jsonl"), "--videos-dir", str(corpus / "videos"), "--data-dir", str(data_dir),
       "--splits", "train,val", "--", "--runner=DirectRunner"],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1], timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "train: 2 clips" in result.stdout and "val: 2 clips" in result.stdout
  return data_dir, str(data_dir / "video_text_corpus" / "tiny" / "1.0.0")


def test_the_finished_build_run_again_is_complete_and_writes_nothing(built, corpus, capsys):
  from data_pipelines.tfds import build_corpus
  data_dir, _ = built
  before = tree_state(data_dir)
  build_corpus.main(["--name", "tiny", "--annotations", str(corpus / "ann.jsonl"), "--videos-dir",
                     str(corpus / "videos"), "--data-dir", str(data_dir), "--splits", "train,val", "--",
                     "--runner=DirectRunner"])
  out = capsys.readouterr().out
  assert "is complete (built earlier); nothing to do" in out and "train: 2 clips" in out
  assert tree_state(data_dir) == before


def test_clips_and_texts_come_back(built):
  data_dir, _ = built
  train, val = read_split(data_dir, "tiny", "train"), read_split(data_dir, "tiny", "val")
  assert sorted(train) == ["c0", "c1"] and sorted(val) == ["c2", "c3"]
  assert (train["c0"].captions, train["c0"].subtitle, train["c0"].caption) == ([], "asr zero", "ofa zero")
  # c1 appears twice: the line that sorts first is kept (its "video" is v1.mp4), the other is reported.
  assert train["c1"].captions == ["one", "uno"]
  assert float(decode_jpeg(train["c1"].frames[0]).mean()) == pytest.approx(100, abs=4)
  assert all(r.split == "train" for r in train.values()) and all(r.split == "val" for r in val.values())
  assert train["c0"].num_frames == 5 and train["c0"].source_fps == SOURCE_FPS


def test_segment_bounds_are_applied(built):
  data_dir, _ = built
  segment = read_split(data_dir, "tiny", "val")["c2"]
  assert (segment.start, segment.end) == (0.4, 0.8)
  assert segment.num_frames == 2  # t in [0.4, 0.8) at 5 fps: 0.4 and 0.6
  assert float(np.mean(decode_jpeg(segment.frames[0]))) == pytest.approx(160, abs=4)


def test_every_unwritten_input_is_reported(built):
  _, dataset_dir = built
  train = skipped_entries(dataset_dir, "train")
  by_clip = {e.get("clip_id"): e["reason"] for e in train}
  assert by_clip["bad"].startswith("not a readable video")
  assert by_clip["gone"] == "file not found"
  assert by_clip["c1"] == "duplicate clip_id (another line kept)"
  assert by_clip["t0"] == "split 'test' is not one the config builds ['train', 'val']"
  bad_lines = [e for e in train if "clip_id" not in e]
  assert [e["line"] for e in bad_lines] == ["{this is not json"]
  assert bad_lines[0]["reason"].startswith("bad annotation line: Expecting property name")
  assert len(train) == 5
  assert skipped_entries(dataset_dir, "val") == []  # lines that concern no split are reported once


def test_missing_annotation_file_is_a_clear_error(tmp_path):
  config = clip_tfds.VideoTextCorpusConfig(name="none", annotations=str(tmp_path / "nothing-*.jsonl"),
                                           videos_dir=str(tmp_path))
  builder = clip_tfds.VideoTextCorpus(config=config, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(clip_tfds.MissingManualFilesError, match=r"no annotation file matches .*nothing-\*\.jsonl"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        beam_options=PipelineOptions(["--runner=DirectRunner"])))


def test_config_rejects_bad_split_names():
  with pytest.raises(ValueError, match="splits must be non-empty names"):
    clip_tfds.VideoTextCorpusConfig(name="x", splits=("train-1",))
