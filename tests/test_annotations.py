"""Parsers of the official annotation formats (data_pipelines/annotations.py), on miniature copies written here
and on the real MSR-VTT 1k-A test file."""

import json
import os
import pickle

import pytest

from data_pipelines import annotations as ann
from data_pipelines.clip_annotation import read_annotation_lines


def _write_json(path, obj):
  path.write_text(json.dumps(obj))
  return path


def _msrvtt_json(path, videos):
  """videos: {video_id: (official split, [captions])} in MSRVTT_data.json form."""
  data = {"info": {}, "videos": [], "sentences": []}
  for i, (vid, (split, caps)) in enumerate(videos.items()):
    data["videos"].append({"video_id": vid, "split": split, "category": 1, "url": "u", "start time": 1.0,
                           "end time": 9.0, "id": i})
    data["sentences"] += [{"video_id": vid, "caption": f" {c} ", "sen_id": len(data["sentences"]) + k}
                          for k, c in enumerate(caps)]
  return _write_json(path, data)


def test_msrvtt_jsfusion_test_real_file(shared_data_dir):
  clips = ann.parse_msrvtt_jsfusion_test(shared_data_dir / "MSRVTT_JSFUSION_test.csv")
  assert len(clips) == 1000
  assert len({c["clip_id"] for c in clips}) == 1000
  assert clips[0] == {"clip_id": "video9770", "video": "video9770",
                      "captions": ["a person is connecting something to system"], "split": "test"}
  assert all(c["split"] == "test" and len(c["captions"]) == 1 and c["captions"][0] for c in clips)


def test_msrvtt_official_split_and_7k(tmp_path):
  data = _msrvtt_json(tmp_path / "MSRVTT_data.json", {
      "video0": ("train", ["a", "b"]), "video6513": ("validate", ["c"]), "video7010": ("test", ["d", "e"])})
  clips = ann.parse_msrvtt_official(data)
  assert [(c["clip_id"], c["split"], c["captions"]) for c in clips] == [
      ("video0", "train", ["a", "b"]), ("video6513", "val", ["c"]), ("video7010", "test", ["d", "e"])]
  seven_k = ann.parse_msrvtt_official(data, ("train", "val"), rename={"val": "train"})
  assert [(c["clip_id"], c["split"]) for c in seven_k] == [("video0", "train"), ("video6513", "train")]


def test_msrvtt_videodatainfo_pair_and_split_csv(tmp_path):
  train_val = _msrvtt_json(tmp_path / "train_val_videodatainfo.json", {"video0": ("train", ["a"]),
                                                                        "video1": ("train", ["b", "c"])})
  test = _msrvtt_json(tmp_path / "test_videodatainfo.json", {"video9": ("test", ["z"])})
  csv_path = tmp_path / "MSRVTT_train.9k.csv"
  csv_path.write_text("video_id\nvideo1\nvideo9\n")
  clips = ann.parse_msrvtt_split_csv(csv_path, [train_val, test], "train")
  assert [(c["clip_id"], c["captions"], c["split"]) for c in clips] == [
      ("video1", ["b", "c"], "train"), ("video9", ["z"], "train")]


def test_msrvtt_errors_name_file_and_entry(tmp_path):
  data = _msrvtt_json(tmp_path / "MSRVTT_data.json", {"video0": ("train", ["a"])})
  csv_path = tmp_path / "MSRVTT_train.9k.csv"
  csv_path.write_text("video_id\nvideo0\nvideo5\n")
  with pytest.raises(ann.AnnotationError, match=r"MSRVTT_train\.9k\.csv: row 3: video 'video5' has no caption"):
    ann.parse_msrvtt_split_csv(csv_path, data, "train")
  bad = _write_json(tmp_path / "bad.json", {"videos": [{"video_id": "v", "split": "dev"}], "sentences": []})
  with pytest.raises(ann.AnnotationError, match=r"bad\.json: videos\[0\]: unknown split 'dev'"):
    ann.read_msrvtt_data_json(bad)
  no_col = tmp_path / "no_col.csv"
  no_col.write_text("vid\nvideo0\n")
  with pytest.raises(ann.AnnotationError, match=r"no_col\.csv: missing column\(s\) \['video_id'\]"):
    ann.parse_msrvtt_split_csv(no_col, data, "train")


def test_didemo_groups_by_video_in_temporal_order(tmp_path):
  moments = [
      {"annotation_id": 1, "video": "a@N00_1_x.mov", "description": "third part ", "times": [[4, 5], [4, 4]]},
      {"annotation_id": 2, "video": "b@N00_2_y.mov", "description": "only one", "times": [[0, 0]]},
      {"annotation_id": 3, "video": "a@N00_1_x.mov", "description": "first part", "times": [[0, 1], [0, 0]]},
      {"annotation_id": 4, "video": "a@N00_1_x.mov", "description": "second part", "times": [[2, 2], [1, 3]]},
  ]
  clips = ann.parse_didemo(_write_json(tmp_path / "test_data.json", moments), "test")
  assert clips == [
      {"clip_id": "a@N00_1_x.mov", "video": "a@N00_1_x.mov", "captions": ["first part", "second part", "third part"],
       "split": "test"},
      {"clip_id": "b@N00_2_y.mov", "video": "b@N00_2_y.mov", "captions": ["only one"], "split": "test"}]
  assert ann.join_paragraph(clips[0]["captions"]) == "first part second part third part"
  with pytest.raises(ann.AnnotationError, match=r"bad\.json: \[0\]: missing key 'times'"):
    ann.parse_didemo(_write_json(tmp_path / "bad.json", [{"video": "v", "description": "d"}]), "train")


def test_activitynet_orders_sentences_by_start(tmp_path):
  data = {"v_abc": {"duration": 50.0, "timestamps": [[20.0, 30.0], [0.5, 10.0], [20.0, 25.0]],
                    "sentences": [" Then he jumps.", "A man runs.", " He lands. "]},
          "v_def": {"duration": 9.0, "timestamps": [[0, 9]], "sentences": ["Alone."]}}
  clips = ann.parse_activitynet(_write_json(tmp_path / "val_1.json", data), "test")
  assert [(c["clip_id"], c["captions"], c["split"]) for c in clips] == [
      ("v_abc", ["A man runs.", "Then he jumps.", "He lands."], "test"), ("v_def", ["Alone."], "test")]
  assert ann.join_paragraph(clips[0]["captions"]) == "A man runs. Then he jumps. He lands."
  bad = {"v_x": {"timestamps": [[0, 1]], "sentences": ["a", "b"]}}
  with pytest.raises(ann.AnnotationError, match=r"'v_x': 'sentences' and 'timestamps' must be lists of the same"):
    ann.parse_activitynet(_write_json(tmp_path / "bad.json", bad), "train")


def test_lsmdc_tab_separated_six_fields(tmp_path):
  path = tmp_path / "LSMDC16_annos_training.csv"
  path.write_text(
      "0001_Movie_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000\tSOMEONE runs.\n"
      "\n"
      "0001_Movie_00.01.00.000-00.01.02.000\t1\t2\t3\t4\tSOMEONE sits\tdown.\n"
      "0001_Movie_00.00.51.926-00.00.54.129\t1\t2\t3\t4\tShe smiles.\n")
  clips = ann.parse_lsmdc(path, "train")
  assert [(c["clip_id"], c["video"], c["captions"]) for c in clips] == [
      ("0001_Movie_00.00.51.926-00.00.54.129", "0001_Movie_00.00.51.926-00.00.54.129",
       ["SOMEONE runs.", "She smiles."]),
      ("0001_Movie_00.01.00.000-00.01.02.000", "0001_Movie_00.01.00.000-00.01.02.000", ["SOMEONE sits\tdown."])]
  bad = tmp_path / "bad.csv"
  bad.write_text("clip\t1\t2\tsentence\n")
  with pytest.raises(ann.AnnotationError, match=r"bad\.csv: line 1: expected 6 tab-separated fields, got 4"):
    ann.parse_lsmdc(bad, "train")


def test_msvd_raw_captions_and_lists(tmp_path):
  pkl = tmp_path / "raw-captions.pkl"
  pkl.write_bytes(pickle.dumps({"-4wsuPCjDBc_5_15": [["a", "man", "cooks"], ["someone", "is", "cooking"]],
                                "zz_1_2": [["a", "dog"]]}))
  (tmp_path / "test_list.txt").write_text("zz_1_2\n-4wsuPCjDBc_5_15\n\n")
  clips = ann.parse_msvd(pkl, tmp_path / "test_list.txt", "test")
  assert [(c["clip_id"], c["captions"]) for c in clips] == [
      ("zz_1_2", ["a dog"]), ("-4wsuPCjDBc_5_15", ["a man cooks", "someone is cooking"])]
  (tmp_path / "val_list.txt").write_text("missing_1_2\n")
  with pytest.raises(ann.AnnotationError, match=r"val_list\.txt: video 'missing_1_2' has no caption"):
    ann.parse_msvd(pkl, tmp_path / "val_list.txt", "val")


def test_msvd_pickle_with_code_is_refused(tmp_path):
  pkl = tmp_path / "raw-captions.pkl"
  pkl.write_bytes(pickle.dumps({"v": [os.getcwd]}))  # a reference to a callable: a global in the pickle
  with pytest.raises(ann.AnnotationError, match="only dicts, lists and strings are allowed"):
    ann.read_msvd_captions(pkl)


def test_vatex_official_and_clip2video_layouts(tmp_path):
  training = _write_json(tmp_path / "vatex_training_v1.0.json", [
      {"videoID": "aaa_000010_000020", "enCap": ["A cat.", "A kitten."], "chCap": ["猫"]},
      {"videoID": "bbb_000000_000010", "enCap": ["A dog."], "chCap": []}])
  validation = _write_json(tmp_path / "vatex_validation_v1.0.json", [
      {"videoID": "ccc_000005_000015", "enCap": ["A bird."], "chCap": []}])
  (tmp_path / "test_list.txt").write_text("ccc_000005_000015\n")
  train = ann.parse_vatex([training], "train")
  assert [(c["clip_id"], c["captions"]) for c in train] == [
      ("aaa_000010_000020", ["A cat.", "A kitten."]), ("bbb_000000_000010", ["A dog."])]
  test = ann.parse_vatex([training, validation], "test", tmp_path / "test_list.txt")
  assert [(c["clip_id"], c["captions"], c["split"]) for c in test] == [("ccc_000005_000015", ["A bird."], "test")]
  as_dict = _write_json(tmp_path / "vatex_data.json", {"ccc_000005_000015": {"enCap": ["A bird."]}})
  assert ann.parse_vatex([as_dict], "test", tmp_path / "test_list.txt") == test
  with pytest.raises(ann.AnnotationError, match="appears in more than one caption file"):
    ann.read_vatex_captions([validation, as_dict])


def test_clips_are_build_shards_annotation_lines(tmp_path):
  clips = [{"clip_id": "v1", "video": "v1", "captions": ["a b"], "split": "test"},
           {"clip_id": "v2", "video": "v2.mp4", "captions": ["c", "d"], "split": "train", "start": 1.0, "end": 3.5}]
  ann.write_jsonl(clips, tmp_path / "ann.jsonl")
  parsed = read_annotation_lines(str(tmp_path / "ann.jsonl"))
  assert [(a.clip_id, a.video, a.captions, a.split, a.start, a.end) for a in parsed] == [
      ("v1", "v1", ("a b",), "test", None, None), ("v2", "v2.mp4", ("c", "d"), "train", 1.0, 3.5)]
  assert not (tmp_path / "ann.jsonl.tmp").exists()


def test_empty_captions_are_an_error(tmp_path):
  path = _write_json(tmp_path / "val_1.json", {"v_a": {"timestamps": [[0, 1]], "sentences": ["  "]}})
  with pytest.raises(ann.AnnotationError, match="clip 'v_a' has no non-empty caption"):
    ann.parse_activitynet(path, "test")
