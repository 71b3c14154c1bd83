"""The TFDS builders (data_pipelines/tfds/) on miniature copies of each benchmark in its official format, with
tiny generated videos: build into a temporary data_dir (ArrayRecord, no TensorFlow), read back through
tfds.data_source (TfdsRecordSource) and records.decode_record, and check counts, captions, paragraph joins,
splits, the frames of the right video, and the skipped-input report."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tree_state

from data_pipelines import tfds as clip_tfds
from data_pipelines.tfds import build as build_cli
from data_pipelines.records import decode_record
from data_pipelines.video_io import decode_jpeg

SIZE = 32
SOURCE_FPS = 10
NUM_FRAMES = 10  # 1 s of video: 5 frames kept at the default 5 fps


def write_video(path, shade: int, codec: str = "libx264") -> None:
  """A 1 s, 32x32 video whose every frame is the grey level `shade`, so a record's frames name their video."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=SOURCE_FPS)
    stream.width = stream.height = SIZE
    stream.pix_fmt = "yuv420p"
    frame = np.full((SIZE, SIZE, 3), shade, np.uint8)
    for _ in range(NUM_FRAMES):
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def shade_of(record) -> float:
  return float(decode_jpeg(record.frames[0]).mean())


def build(builder_cls, manual, data_dir, config=None):
  builder = builder_cls(config=config, data_dir=str(data_dir), num_workers=1)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def read(builder, split):
  name = f"{builder.name}/{builder.builder_config.name}"
  data_dir = pathlib.Path(builder.data_dir).parents[2]  # DATA_DIR/name/config/version
  source = clip_tfds.TfdsRecordSource(name, split, data_dir=str(data_dir))
  return sorted((decode_record(source[i]) for i in range(len(source))), key=lambda r: r.clip_id)


def skipped(builder, split):
  with open(os.path.join(builder.data_dir, f"skipped-{split}.jsonl")) as f:
    return [json.loads(line) for line in f]


def msrvtt_data_json(path, videos):
  data = {"videos": [{"video_id": v, "split": s} for v, (s, _) in videos.items()],
          "sentences": [{"video_id": v, "caption": c, "sen_id": 0} for v, (_, caps) in videos.items() for c in caps]}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))


def test_msrvtt_9k_with_real_jsfusion_rows(tmp_path, shared_data_dir):
  manual = tmp_path / "manual"
  rows = (shared_data_dir / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[:3]  # header + 2 test videos
  test_ids = [r.split(",")[2] for r in rows[1:]]
  (manual / "msrvtt_data").mkdir(parents=True)
  (manual / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")
  (manual / "msrvtt_data" / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo2\nvideo3\n")
  videos = {"video1": ("train", ["a man sings", "someone sings"]), "video2": ("train", ["a cat"]),
            "video3": ("validate", ["a car"]), test_ids[0]: ("test", ["x"]), test_ids[1]: ("test", ["y"])}
  msrvtt_data_json(manual / "msrvtt_data" / "MSRVTT_data.json", videos)
  write_video(manual / "TrainValVideo" / "video1.mp4", 40)
  (manual / "TrainValVideo" / "video2.mp4").write_bytes(b"")  # empty: skipped; video3 is missing: skipped
  write_video(manual / "TestVideo" / f"{test_ids[0]}.mp4", 120)
  write_video(manual / "TestVideo" / f"{test_ids[1]}.mp4", 200)

  builder = build(clip_tfds.Msrvtt, manual, tmp_path / "data", "9k")
  train, test = read(builder, "train"), read(builder, "test")
  assert [(r.clip_id, r.captions, r.split) for r in train] == [("video1", ["a man sings", "someone sings"], "train")]
  assert train[0].num_frames == 5 and train[0].fps == 5.0 and train[0].source_fps == SOURCE_FPS
  assert abs(shade_of(train[0]) - 40) < 4
  expected_test = {r.split(",")[2]: r.split(",", 3)[3] for r in rows[1:]}
  assert {r.clip_id: r.captions for r in test} == {k: [v] for k, v in expected_test.items()}
  assert [round(shade_of(r) / 40) for r in test] == [3, 5]
  reasons = {s["clip_id"]: s["reason"] for s in skipped(builder, "train")}
  assert reasons["video2"] == "empty file (0 bytes)"
  assert reasons["video3"].startswith("video not found under")
  assert skipped(builder, "test") == []
  assert builder.info.metadata["num_skipped"] == {"train": 2, "test": 0}
  assert builder.info.splits["train"].num_examples == 1


def test_msrvtt_full_custom_config(tmp_path):
  manual = tmp_path / "manual"
  msrvtt_data_json(manual / "MSRVTT_data.json", {"video0": ("train", ["t0", "t1"]), "video6513": ("validate", ["v"]),
                                                 "video7010": ("test", ["s"])})
  for i, vid in enumerate(["video0", "video6513", "video7010"]):
    write_video(manual / "MSRVTT_Videos" / f"{vid}.mp4", 50 + 50 * i)
  config = clip_tfds.ClipBuilderConfig(name="full_fps2", scheme="full", fps=2.0, short_side=16)
  builder = build(clip_tfds.Msrvtt, manual, tmp_path / "data", config)
  got = {split: [(r.clip_id, r.captions, r.split) for r in read(builder, split)] for split in ("train", "val", "test")}
  assert got == {"train": [("video0", ["t0", "t1"], "train")], "val": [("video6513", ["v"], "val")],
                 "test": [("video7010", ["s"], "test")]}
  record = read(builder, "val")[0]
  assert record.num_frames == 2 and record.fps == 2.0  # 1 s at 2 fps
  assert decode_jpeg(record.frames[0]).shape == (16, 16, 3)
  assert builder.info.metadata["frame_options"]["fps"] == 2.0


def didemo_manual(manual):
  moments = {
      "train_data.json": [
          {"video": "11@N00_1_a.mov", "description": "later she waves", "times": [[3, 4], [3, 3]]},
          {"video": "11@N00_1_a.mov", "description": "a girl walks in", "times": [[0, 0], [0, 1]]},
          {"video": "22@N00_2_b.mov", "description": "a dog barks", "times": [[1, 1]]}],
      "val_data.json": [{"video": "33@N00_3_c.mov", "description": "rain falls", "times": [[0, 5]]}],
      "test_data.json": [{"video": "44@N00_4_d.mov", "description": "the end", "times": [[5, 5]]},
                         {"video": "44@N00_4_d.mov", "description": "the start", "times": [[0, 0]]}],
  }
  manual.mkdir(parents=True)
  for name, data in moments.items():
    (manual / name).write_text(json.dumps(data))
  # Transcoded copies (.mp4) of the .mov originals are found by the name without extension.
  for i, video in enumerate(["11@N00_1_a", "22@N00_2_b", "33@N00_3_c", "44@N00_4_d"]):
    write_video(manual / "videos" / f"{video}.mp4", 40 * (i + 1))


def test_didemo_paragraph_and_sentences(tmp_path):
  didemo_manual(tmp_path / "manual")
  paragraph = build(clip_tfds.Didemo, tmp_path / "manual", tmp_path / "data", "paragraph")
  train = read(paragraph, "train")
  assert [(r.clip_id, r.captions) for r in train] == [("11@N00_1_a.mov", ["a girl walks in later she waves"]),
                                                      ("22@N00_2_b.mov", ["a dog barks"])]
  assert [round(shade_of(r) / 40) for r in train] == [1, 2]
  assert [r.captions for r in read(paragraph, "test")] == [["the start the end"]]
  assert [r.split for r in read(paragraph, "val")] == ["val"]
  assert paragraph.info.metadata["text"] == "paragraph"
  sentences = build(clip_tfds.Didemo, tmp_path / "manual", tmp_path / "data", "sentences")
  assert [r.captions for r in read(sentences, "train")] == [["a girl walks in", "later she waves"], ["a dog barks"]]


def test_activitynet_val1_is_test_and_paragraphs_join(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train.json").write_text(json.dumps({
      "v_aaa": {"duration": 1.0, "timestamps": [[0.5, 1.0], [0.0, 0.5]], "sentences": [" He jumps.", "A man runs. "]}}))
  (manual / "val_1.json").write_text(json.dumps({
      "v_bbb": {"duration": 1.0, "timestamps": [[0.0, 1.0]], "sentences": ["A bird sings."]},
      "v_ccc": {"duration": 1.0, "timestamps": [[0.0, 1.0]], "sentences": ["Nobody filmed this."]}}))
  write_video(manual / "v_aaa.mp4", 60)
  write_video(manual / "val" / "bbb.mp4", 180)  # a mirror without the "v_" prefix
  builder = build(clip_tfds.ActivitynetCaptions, manual, tmp_path / "data")
  assert builder.name == "activitynet_captions" and builder.builder_config.name == "paragraph"
  assert [(r.clip_id, r.captions, r.split) for r in read(builder, "train")] == [
      ("v_aaa", ["A man runs. He jumps."], "train")]
  test = read(builder, "test")
  assert [(r.clip_id, r.captions, r.split) for r in test] == [("v_bbb", ["A bird sings."], "test")]
  assert abs(shade_of(test[0]) - 180) < 4
  assert [s["clip_id"] for s in skipped(builder, "test")] == ["v_ccc"]


def test_lsmdc_movie_folders(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  files = {"LSMDC16_annos_training.csv": ["0001_A_00.00.01.000-00.00.02.000", "0001_A_00.00.05.000-00.00.06.000"],
           "LSMDC16_annos_val.csv": ["0002_B_00.00.01.000-00.00.02.000"],
           "LSMDC16_challenge_1000_publictect.csv": ["0003_C_00.00.01.000-00.00.02.000"]}
  shade = 30
  for name, clips in files.items():
    (manual / name).write_text("".join(f"{c}\t0\t1\t0\t1\tSOMEONE does {c[-5:]}.\n" for c in clips))
    for clip in clips:
      write_video(manual / "avi" / clip[:6] / f"{clip}.avi", shade, codec="mpeg4")
      shade += 40
  builder = build(clip_tfds.Lsmdc, manual, tmp_path / "data")
  train = read(builder, "train")
  assert [(r.clip_id, r.captions) for r in train] == [
      ("0001_A_00.00.01.000-00.00.02.000", ["SOMEONE does 2.000."]),
      ("0001_A_00.00.05.000-00.00.06.000", ["SOMEONE does 6.000."])]
  assert [shade_of(r) for r in train] == pytest.approx([30, 70], abs=4)
  assert [r.clip_id for r in read(builder, "test")] == ["0003_C_00.00.01.000-00.00.02.000"]
  assert len(read(builder, "val")) == 1


def test_msvd_multi_caption(tmp_path):
  manual = tmp_path / "manual"
  (manual / "msvd_data").mkdir(parents=True)
  captions = {"aa_1_5": [["a", "man", "sings"], ["he", "sings"]], "bb_2_6": [["a", "cat"]], "cc_0_3": [["rain"]]}
  (manual / "msvd_data" / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
  for split, ids in {"train": ["aa_1_5"], "val": ["bb_2_6"], "test": ["cc_0_3"]}.items():
    (manual / "msvd_data" / f"{split}_list.txt").write_text("\n".join(ids) + "\n")
  for i, vid in enumerate(captions):
    write_video(manual / "YouTubeClips" / f"{vid}.avi", 50 + 60 * i, codec="mpeg4")
  builder = build(clip_tfds.Msvd, manual, tmp_path / "data")
  assert [(r.clip_id, r.captions) for r in read(builder, "train")] == [("aa_1_5", ["a man sings", "he sings"])]
  assert [(r.clip_id, r.split) for r in read(builder, "test")] == [("cc_0_3", "test")]


def test_vatex_official_files_and_test_list(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "vatex_training_v1.0.json").write_text(json.dumps([
      {"videoID": "tr1_000000_000010", "enCap": ["one", "two"], "chCap": []},
      {"videoID": "tr2_000000_000010", "enCap": ["three"], "chCap": []}]))
  (manual / "vatex_validation_v1.0.json").write_text(json.dumps([
      {"videoID": "va1_000000_000010", "enCap": ["four"], "chCap": []},
      {"videoID": "va2_000000_000010", "enCap": ["five"], "chCap": []}]))
  (manual / "test_list.txt").write_text("va2_000000_000010\n")
  for i, vid in enumerate(["tr1_000000_000010", "tr2_000000_000010", "va1_000000_000010", "va2_000000_000010"]):
    write_video(manual / "videos" / f"{vid}.mp4", 40 * (i + 1))
  builder = build(clip_tfds.Vatex, manual, tmp_path / "data")
  assert [(r.clip_id, r.captions) for r in read(builder, "train")] == [
      ("tr1_000000_000010", ["one", "two"]), ("tr2_000000_000010", ["three"])]
  test = read(builder, "test")
  assert [(r.clip_id, r.captions) for r in test] == [("va2_000000_000010", ["five"])]
  assert round(shade_of(test[0]) / 40) == 4


def test_missing_manual_files_are_all_listed(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train_data.json").write_text("[]")
  with pytest.raises(clip_tfds.MissingManualFilesError) as info:
    build(clip_tfds.Didemo, manual, tmp_path / "data")
  message = str(info.value)
  assert "['val_data.json', 'test_data.json']" in message and str(manual) in message
  assert "LocalizingMoments" in message  # the instructions follow
  with pytest.raises(clip_tfds.MissingManualFilesError, match=r"\['MSRVTT_data.json', 'MSRVTT_train.9k.csv', "
                                                             r"'MSRVTT_JSFUSION_test.csv'\]"):
    build(clip_tfds.Msrvtt, manual, tmp_path / "data", "9k")


def test_a_split_with_every_clip_skipped_fails_clearly(tmp_path):
  didemo_manual(tmp_path / "manual")
  os.remove(tmp_path / "manual" / "videos" / "33@N00_3_c.mp4")  # the only val video
  with pytest.raises(RuntimeError, match=r"didemo split 'val': all 1 clips were skipped .*33@N00_3_c.mov: video "
                                         r"not found"):
    build(clip_tfds.Didemo, tmp_path / "manual", tmp_path / "data")


def test_manual_dir_index(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "a" / "b" / "x.json").write_text("deep")
  (tmp_path / "a" / "x.json").write_text("shallow")
  (tmp_path / "a" / "b" / "clip7.webm").write_bytes(b"v")
  (tmp_path / "frames" / "clip8").mkdir(parents=True)
  (tmp_path / "frames" / "clip8" / "0001.jpg").write_bytes(b"j")
  os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")  # a symlink loop must not hang the walk
  manual = clip_tfds.ManualDir(tmp_path)
  assert manual.find("x.json").read_text() == "shallow"
  assert manual.find("y.json") is None
  assert manual.video(["clip7"]) == str(tmp_path / "a" / "b" / "clip7.webm")
  assert manual.video(["clip7.mov"]) == str(tmp_path / "a" / "b" / "clip7.webm")
  assert manual.video(["nope", "clip8"]) == str(tmp_path / "frames" / "clip8")
  assert manual.video(["nope"]) is None


@pytest.mark.slow
def test_parallel_decoding_gives_the_same_dataset(tmp_path):
  didemo_manual(tmp_path / "manual")
  records = {}
  for workers in (1, 2):
    builder = clip_tfds.Didemo(data_dir=str(tmp_path / f"data{workers}"), num_workers=workers)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
    records[workers] = {split: read(builder, split) for split in ("train", "val", "test")}
  assert records[1] == records[2]


def test_build_command_line_with_frame_options(tmp_path):
  didemo_manual(tmp_path / "manual")
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.tfds.build", "didemo/sentences", "--manual-dir", str(tmp_path / "manual"),
       "--data-dir", str(tmp_path / "data"), "--num-workers", "1", "--fps", "2"],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "didemo/sentences_fps2_short224_q90:" in out and "train: 2 clips, 0 skipped" in out
  source = clip_tfds.TfdsRecordSource("didemo/sentences_fps2_short224_q90", "train", data_dir=str(tmp_path / "data"))
  records = sorted((decode_record(source[i]) for i in range(len(source))), key=lambda r: r.clip_id)
  assert [(r.captions, r.num_frames, r.fps) for r in records] == [
      (["a girl walks in", "later she waves"], 2, 2.0), (["a dog barks"], 2, 2.0)]
  with pytest.raises(ValueError, match=r"didemo: no config 'para' \(has \['paragraph', 'sentences'\]\)"):
    build_cli.main(["didemo/para", "--manual-dir", str(tmp_path / "manual"), "--data-dir", str(tmp_path / "data")])


def test_a_finished_build_run_again_is_complete_and_writes_nothing(tmp_path, capsys):
  """A scheduler relaunching a build that had in fact finished: exit 0, 'complete', the dataset untouched."""
  didemo_manual(tmp_path / "manual")
  args = ["didemo/sentences", "--manual-dir", str(tmp_path / "manual"), "--data-dir", str(tmp_path / "data"),
          "--num-workers", "1"]
  build_cli.main(args)
  first = capsys.readouterr().out
  before = tree_state(tmp_path / "data")
  build_cli.main(args)
  again = capsys.readouterr().out
  assert "is complete" not in first and "is complete (built earlier with these options); nothing to do" in again
  assert "train: 2 clips, 0 skipped" in again
  assert tree_state(tmp_path / "data") == before


def test_grain_pipeline_reads_a_tfds_dataset(tmp_path):
  import grain

  from data_pipelines import pipeline

  didemo_manual(tmp_path / "manual")
  build(clip_tfds.Didemo, tmp_path / "manual", tmp_path / "data")
  source = clip_tfds.TfdsRecordSource("didemo/paragraph", "train", data_dir=str(tmp_path / "data"))
  config = {"batch_size": 2, "num_frames": 4, "image_size": 32, "num_epochs": 1}

  def count_words(texts, max_len):  # one token per word: the mask length tells which text was drawn
    mask = np.array([[1] * len(t.split()) + [0] * (max_len - len(t.split())) for t in texts], np.int32)
    return mask.copy(), mask

  with pipeline.make_train_iterator(config, source=source, tokenize_fn=count_words, rows=(0, 1)) as batches:
    batch = next(batches)
  assert batch["video"].shape == (2, 4, 32, 32, 3) and batch["frame_mask"].tolist() == [[1] * 4] * 2
  assert sorted(batch["clip_index"].tolist()) == [0, 1]
  # The paragraphs "a girl walks in later she waves" and "a dog barks", not single sentences.
  assert sorted(batch["text_mask"].sum(axis=1).tolist()) == [3, 7]


def test_shard_dir_names_a_tfds_dataset(tmp_path):
  """Every reader of data.shard_dir (trainer, eval, encode) accepts tfds:NAME@DATA_DIR."""
  from data_pipelines import sources

  didemo_manual(tmp_path / "manual")
  build(clip_tfds.Didemo, tmp_path / "manual", tmp_path / "data")
  spec = f"tfds:didemo/paragraph@{tmp_path / 'data'}"
  assert sources.shard_paths(spec, "train") == [f"{spec}#train"]
  source = sources.open_split(spec, "train")
  direct = clip_tfds.TfdsRecordSource("didemo/paragraph", "train", data_dir=str(tmp_path / "data"))
  assert len(source) == len(direct) == 2 and source[1] == direct[1]
  with pytest.raises(FileNotFoundError, match="split 'nope'"):
    sources.shard_paths(spec, "nope")
