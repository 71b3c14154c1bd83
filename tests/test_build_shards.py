"""build_shards on generated videos: formats, frame rate rule, bad inputs, resume, annotation errors, CLI."""

import json
import os
import pathlib

import av
import numpy as np
import pytest
from conftest import tree_state
from PIL import Image

from data_pipelines import build_shards as bs
from data_pipelines.clip_annotation import AnnotationLineError, ClipAnnotation, read_annotation_lines
from data_pipelines.shard_writer import read_records
from data_pipelines.video_io import FrameOptions, RateSelector, decode_jpeg, resize_short_side

SOURCE_FPS = 10
NUM_FRAMES = 16
WIDTH, HEIGHT = 64, 48
STEP = 12  # colour change per source frame: kept frames are identified by colour, JPEG/YUV error is < STEP/2


def frame_colour(i: int) -> np.ndarray:
  return np.array([20 + STEP * i, 128, 220 - STEP * i], np.float64)


def frame_pixels(i: int) -> np.ndarray:
  return np.broadcast_to(frame_colour(i).astype(np.uint8), (HEIGHT, WIDTH, 3)).copy()


def write_video(path: pathlib.Path, codec: str) -> None:
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=SOURCE_FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    for i in range(NUM_FRAMES):
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pixels(i), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


FORMATS = {"mp4": "libx264", "avi": "mpeg4", "webm": "libvpx", "mkv": "ffv1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Videos in four containers, a frame folder, bad inputs, and their annotation file."""
  root = tmp_path_factory.mktemp("videos")
  videos = root / "videos"
  videos.mkdir()
  lines = []
  for ext, codec in FORMATS.items():
    write_video(videos / f"clip_{ext}.{ext}", codec)
    lines.append({"clip_id": f"clip_{ext}", "video": f"clip_{ext}.{ext}", "captions": [f"a {ext} clip", "more"]})
  folder = videos / "frames"
  folder.mkdir()
  for i in range(12):  # names that sort wrongly as plain strings: frame_10 < frame_2
    Image.fromarray(frame_pixels(i)).save(folder / f"frame_{i + 1}.png")
  lines.append({"clip_id": "folder", "video": "frames", "captions": ["frames in a folder"], "split": "val"})
  lines.append({"clip_id": "segment", "video": "clip_mp4.mp4", "captions": ["a cut"], "start": 0.5, "end": 1.2,
                "subtitle": "asr words", "caption": "ofa caption"})
  # start > 1 s: read through a seek (targets 1.1, 1.3, 1.5 -> source frames 11, 13, 15).
  lines.append({"clip_id": "late", "video": "clip_webm.webm", "captions": ["a late cut"], "start": 1.1, "end": 1.6})
  lines.append({"clip_id": "no_ext", "video": "clip_avi", "captions": ["found by id"], "split": "val"})
  data = (videos / "clip_webm.webm").read_bytes()
  (videos / "truncated.webm").write_bytes(data[:len(data) // 2])
  data = (videos / "clip_mp4.mp4").read_bytes()
  (videos / "truncated.mp4").write_bytes(data[:len(data) * 6 // 10])
  (videos / "empty.mp4").write_bytes(b"")
  (videos / "notes.mkv").write_text("this is not a video\n")
  bad = {"truncated_webm": "truncated.webm", "truncated_mp4": "truncated.mp4", "empty": "empty.mp4",
         "not_video": "notes.mkv", "missing": "missing.mp4"}
  lines += [{"clip_id": k, "video": v, "captions": [k]} for k, v in bad.items()]
  ann = root / "ann.jsonl"
  ann.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  return videos, ann, bad


OPTIONS = FrameOptions(fps=5, short_side=32)


def all_files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def build(dataset, out, workers=1):
  videos, ann, _ = dataset
  annotations = read_annotation_lines(str(ann))
  return bs.build_shards(annotations, str(videos), str(out), OPTIONS, shard_size=3, workers=workers, progress=False)


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
  out = tmp_path_factory.mktemp("shards")
  return out, build(dataset, out)


def test_bad_inputs_are_skipped_with_reasons(built, dataset):
  _, manifest = built
  bad = dataset[2]
  reasons = {item["clip_id"]: item["reason"] for item in manifest["skipped"]}
  assert set(reasons) == set(bad)
  assert reasons["truncated_webm"].startswith("truncated")
  assert reasons["truncated_mp4"].startswith("no video stream")
  assert reasons["empty"] == "empty file (0 bytes)"
  assert reasons["not_video"].startswith("not a readable video")
  assert reasons["missing"] == "file not found"
  assert manifest["counts"] == {"inputs": 13, "records": 8, "skipped": 5, "shards": 5}
  assert manifest["splits"]["val"]["records"] == 2 and manifest["splits"]["train"]["records"] == 6
  assert manifest["splits"]["train"]["skipped"] == 5
  assert manifest["options"]["fps"] == 5 and manifest["options"]["short_side"] == 32


def records_by_id(out: pathlib.Path, manifest) -> dict:
  records = {}
  for shard in manifest["shards"]:
    shard_records = list(read_records(str(out / shard["file"])))
    assert len(shard_records) == shard["records"]
    records.update({r.clip_id: r for r in shard_records})
  return records


def assert_frames(record, source_indices, size=(32, 43)):
  assert record.num_frames == len(source_indices)
  for frame, i in zip(record.frames, source_indices):
    pixels = decode_jpeg(frame)
    assert pixels.shape == (*size, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), frame_colour(i), atol=STEP / 2)


def test_good_clips_decode_to_the_expected_frames(built):
  out, manifest = built
  records = records_by_id(out, manifest)
  assert set(records) == {"clip_mp4", "clip_avi", "clip_webm", "clip_mkv", "folder", "segment", "late", "no_ext"}
  for ext in FORMATS:
    rec = records[f"clip_{ext}"]
    # 10 fps source at 5 fps: every other frame, 0, 2, ..., 14.
    assert_frames(rec, range(0, NUM_FRAMES, 2))
    assert (rec.fps, rec.source_fps, rec.split) == (5.0, 10.0, "train")
    assert rec.captions == [f"a {ext} clip", "more"] and rec.start is None
  # Folder: every image (rate unknown), in natural order (frame_2 before frame_10), fps 0.0 = unknown.
  assert_frames(records["folder"], range(12))
  assert (records["folder"].fps, records["folder"].split) == (0.0, "val")
  # Segment [0.5, 1.2): targets 0.5, 0.7, 0.9, 1.1 -> source frames 5, 7, 9, 11.
  seg = records["segment"]
  assert_frames(seg, [5, 7, 9, 11])
  assert (seg.start, seg.end, seg.subtitle, seg.caption) == (0.5, 1.2, "asr words", "ofa caption")
  assert_frames(records["late"], [11, 13, 15])
  assert_frames(records["no_ext"], range(0, NUM_FRAMES, 2))


def test_rate_rule_never_duplicates_and_follows_targets():
  from fractions import Fraction
  def kept(source_fps, fps, n):
    sel = RateSelector(fps)
    return [i for i in range(n) if sel.keep(Fraction(i, source_fps))]
  assert kept(30, 5, 31) == [0, 6, 12, 18, 24, 30]
  assert kept(24, 5, 25) == [0, 5, 10, 15, 20, 24]  # targets 0.2, 0.4, ... reached at 5/24, 10/24, ...
  assert kept(4, 5, 6) == [0, 1, 2, 3, 4, 5]        # slower source: every frame, none twice
  assert kept(10, 0, 7) == list(range(7))


def test_resize_short_side_is_bicubic_and_never_upscales():
  image = Image.fromarray(np.zeros((48, 64, 3), np.uint8))
  assert resize_short_side(image, 32).size == (43, 32)
  assert resize_short_side(image, 100).size == (64, 48)
  assert resize_short_side(image.transpose(Image.Transpose.TRANSPOSE), 32).size == (32, 43)
  assert resize_short_side(image, 0).size == (64, 48)


def test_interrupted_build_resumes_to_identical_bytes(built, dataset, tmp_path, monkeypatch):
  reference, _ = built
  out = tmp_path / "resumed"
  real = bs.clip_to_record_or_reason
  calls = []

  def interrupted(*args):
    calls.append(1)
    if len(calls) == 8:  # a kill in the middle of the third shard
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(bs, "clip_to_record_or_reason", interrupted)
  with pytest.raises(KeyboardInterrupt):
    build(dataset, out)
  monkeypatch.setattr(bs, "clip_to_record_or_reason", real)
  finished = sorted(p.name for p in out.glob("*.array_record"))
  assert len(finished) == 2 and not (out / "manifest.json").exists()
  assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the aborted shard left no temporary file
  # A kill -9 leaves temporaries behind; the resumed build removes them.
  (out / ".train-00002-of-00004.array_record.tmp-99999").write_bytes(b"partial")
  before = {name: os.stat(out / name).st_mtime_ns for name in finished}
  build(dataset, out, workers=2)
  assert {name: os.stat(out / name).st_mtime_ns for name in finished} == before  # not redone
  assert all_files(out) == all_files(reference)
  # Deleting a finished shard redoes exactly that shard.
  (out / "train-00001-of-00004.array_record").unlink()
  build(dataset, out)
  assert all_files(out) == all_files(reference)


def test_resume_with_other_settings_is_refused(built, dataset):
  out, _ = built
  videos, ann, _ = dataset
  with pytest.raises(bs.BuildError, match="fps"):
    bs.build_shards(read_annotation_lines(str(ann)), str(videos), str(out), FrameOptions(fps=2, short_side=32),
                    shard_size=3, progress=False)


def test_plan_is_deterministic_and_grouped_by_split():
  anns = [ClipAnnotation(f"c{i}", "v", ("t",), split="val" if i % 3 == 0 else "train") for i in range(10)]
  plan = bs.plan_shards(anns, 4)
  assert [t.name for t in plan] == ["train-00000-of-00002.array_record", "train-00001-of-00002.array_record",
                                    "val-00000-of-00001.array_record"]
  assert [a.clip_id for a in plan[0].annotations] == ["c1", "c2", "c4", "c5"]


@pytest.mark.parametrize("line, message", [
    ('{"clip_id": "a", "video": "v.mp4"', "ann.jsonl:2: not valid JSON"),
    ('{"clip_id": "a", "captions": ["x"]}', "ann.jsonl:2: missing required field 'video'"),
    ('{"clip_id": "a", "video": "v.mp4", "captions": "x"}', "ann.jsonl:2: field 'captions' must be a list"),
    ('{"clip_id": "a", "video": "v.mp4", "captions": ["x"], "start": 3, "end": 2}', "ann.jsonl:2: field 'end'"),
    ('{"clip_id": "a", "video": "v.mp4", "captions": ["x"], "start": -1}', "ann.jsonl:2: field 'start'"),
    ('{"clip_id": "a", "video": "v.mp4", "captions": ["x"], "split": "a/b"}', "ann.jsonl:2: field 'split'"),
    ('{"clip_id": "a", "video": "v.mp4", "captoins": ["x"]}', "ann.jsonl:2: unknown field"),
    ('{"clip_id": "a", "video": "v.mp4", "captions": []}', "ann.jsonl:2: no text"),
    ('{"clip_id": "z", "video": "v.mp4", "captions": ["x"]}', "ann.jsonl:2: field 'clip_id' 'z' repeats line 1"),
])
def test_annotation_errors_name_line_and_field(tmp_path, line, message):
  ann = tmp_path / "ann.jsonl"
  ann.write_text('{"clip_id": "z", "video": "v.mp4", "captions": ["x"]}\n' + line + "\n")
  with pytest.raises(AnnotationLineError, match=message.replace("(", r"\(").replace("[", r"\[")):
    read_annotation_lines(str(ann))


def test_cli_fails_with_one_sentence(tmp_path, capsys, dataset):
  videos, ann, _ = dataset
  assert bs.main(["--videos", str(tmp_path / "nope"), "--annotations", str(ann), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "is not a directory" in err
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"clip_id": "a", "video": "v.mp4", "captions": ["x"]}\n{"clip_id": 3}\n')
  assert bs.main(["--videos", str(videos), "--annotations", str(bad), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "bad.jsonl:2" in err


def test_cli_builds_and_prints_a_summary(tmp_path, capsys, dataset):
  videos, ann, _ = dataset
  out = tmp_path / "cli"
  code = bs.main(["--videos", str(videos), "--annotations", str(ann), "--out", str(out), "--fps", "0",
                  "--short-side", "0", "--workers", "1", "--quiet"])
  assert code == 0
  summary = capsys.readouterr().out
  assert "wrote 8 records" in summary and "skipped 5" in summary and "1 x empty file" in summary
  records = records_by_id(out, json.loads((out / "manifest.json").read_text()))
  assert_frames(records["clip_mkv"], range(NUM_FRAMES), size=(HEIGHT, WIDTH))  # --fps 0: every frame
  # Relaunched after it finished (a scheduler re-running a job that was in fact done): exit 0, complete, and
  # every file as it was, bytes and modification times.
  before = tree_state(out)
  assert bs.main(["--videos", str(videos), "--annotations", str(ann), "--out", str(out), "--fps", "0",
                  "--short-side", "0", "--workers", "1", "--quiet"]) == 0
  again = capsys.readouterr().out
  shards = json.loads((out / "manifest.json").read_text())["counts"]["shards"]
  assert f"build_shards: {out} is complete: all {shards} shards of this build were finished earlier; nothing to do" \
      in again
  assert "wrote 8 records" in again and tree_state(out) == before


def test_model_ready_frames_are_stored_at_the_recipe_size_and_read_without_resizing(dataset, tmp_path):
  """--frame-size S --resize-mode M: frames resized once from the full decode to S x S; the pipeline reads them
  only at (S, M), and says how to rebuild otherwise."""
  from data_pipelines import pipeline
  videos, _, _ = dataset
  line = {"clip_id": "clip_mp4", "video": "clip_mp4.mp4", "captions": ["a clip"]}
  ann = tmp_path / "one.jsonl"
  ann.write_text(json.dumps(line) + "\n")
  out = tmp_path / "ready"
  code = bs.main(["--videos", str(videos), "--annotations", str(ann), "--out", str(out), "--fps", "5",
                  "--frame-size", "24", "--resize-mode", "crop", "--workers", "1", "--quiet"])
  assert code == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert (manifest["options"]["frame_size"], manifest["options"]["resize_mode"]) == (24, "crop")
  record = records_by_id(out, manifest)["clip_mp4"]
  assert_frames(record, range(0, NUM_FRAMES, 2), size=(24, 24))
  config = dict(shard_dir=str(out), split="train", num_frames=2, image_size=24, resize_mode="crop", batch_size=1,
                max_text_len=8, seed=0, worker_count=0, dtype="uint8")
  with pipeline.make_train_iterator(config) as it:
    assert next(it)["video"].shape == (1, 2, 24, 24, 3)
  for other in (dict(image_size=32), dict(resize_mode="squash")):
    with pytest.raises(ValueError, match=r"model-ready 24x24 .*--frame-size"):
      pipeline.make_train_iterator({**config, **other})


def test_shards_built_before_model_ready_frames_keep_their_fingerprint():
  # A resumed build compares fingerprints: the new fields appear only when used.
  assert "frame_size" not in FrameOptions().manifest_fields()
  assert FrameOptions(frame_size=224).manifest_fields()["resize_mode"] == "squash"
  with pytest.raises(ValueError, match="resize_mode"):
    FrameOptions(frame_size=224, resize_mode="pad")
