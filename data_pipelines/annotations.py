"""Parsers of the official annotation files of the retrieval benchmarks into one list-of-clips form.

Every parser returns `list[dict]`, one dict per clip (a video, or a segment of one), in the order of the
annotation file:

  clip_id   str         unique within the returned list
  video     str         the name the raw video is found under (a file stem, or a file name with extension);
                        `tfds.common.VideoIndex` resolves it against the manual directory
  captions  list[str]   one or more sentences, stripped, in the file's order (paragraph sets: temporal order)
  split     str         "train" / "val" / "test"
  start, end float      only for clips that are a segment of `video` (seconds)

This is also the JSON-lines form that `build_shards` reads, so `write_jsonl` turns any benchmark into a
build_shards input. Paragraph-to-video sets (DiDeMo, ActivityNet) keep one caption per sentence here and
`join_paragraph` makes the single query text the originals retrieve with.

Bad input (a missing key, a wrong type, a split list naming a video without captions) raises
`AnnotationError` naming the file and the entry, never a silent drop.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

Clip = dict[str, Any]


class AnnotationError(ValueError):
  """An annotation file that does not have the documented format; the message names file and entry."""


def join_paragraph(sentences: Iterable[str]) -> str:
  """All sentences joined with single spaces: the paragraph query of DiDeMo / ActivityNet retrieval.

  CLIP-ViP and CLIP4Clip retrieve the whole video with the concatenated description; users of the original
  report R@1 near 20 on ActivityNet when sentences are used one by one instead.
  """
  return " ".join(s.strip() for s in sentences if s.strip())


def _clean(sentence: Any, where: str) -> str:
  if not isinstance(sentence, str):
    raise AnnotationError(f"{where}: caption must be a string, got {type(sentence).__name__}")
  return sentence.strip()


def _clip(clip_id: str, video: str, captions: list[str], split: str, where: str, **segment: float) -> Clip:
  captions = [c for c in captions if c]
  if not captions:
    raise AnnotationError(f"{where}: clip {clip_id!r} has no non-empty caption")
  clip: Clip = {"clip_id": clip_id, "video": video, "captions": captions, "split": split}
  clip.update(segment)
  return clip


@contextlib.contextmanager
def text_file(path: str | os.PathLike, error: type[Exception] | None = None, **kwargs: Any):
  """`open(path, encoding="utf-8")`, where a file that is not UTF-8 (a Latin-1 export, a binary file given by
  mistake) is one sentence naming the file and the byte, instead of a codec error naming neither."""
  try:
    with open(path, encoding="utf-8", **kwargs) as f:
      yield f
  except UnicodeDecodeError as e:
    raise (error or AnnotationError)(
        f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason}); re-save it as UTF-8") from None


def _load_json(path: str | os.PathLike) -> Any:
  try:
    with text_file(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{path}: not valid JSON ({e})") from e


def _get(entry: Any, key: str, where: str) -> Any:
  if not isinstance(entry, dict):
    raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
  if key not in entry:
    raise AnnotationError(f"{where}: missing key {key!r} (has {sorted(entry)[:8]})")
  return entry[key]


def read_id_list(path: str | os.PathLike) -> list[str]:
  """A split list: one video id per line (MSVD train_list.txt, VATEX test_list.txt); blank lines ignored."""
  with text_file(path) as f:
    ids = [line.strip() for line in f if line.strip()]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise AnnotationError(f"{path}: video id {dup!r} listed more than once")
  return ids


def write_jsonl(clips: Sequence[Clip], path: str | os.PathLike) -> None:
  """The clips as build_shards JSON lines (written to a temporary name, then renamed)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for clip in clips:
      f.write(json.dumps(clip, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- MSR-VTT

MSRVTT_SPLITS = {"train": "train", "validate": "val", "test": "test"}


PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _paths(paths: PathOrPaths) -> list[str | os.PathLike]:
  return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def read_msrvtt_data_json(paths: PathOrPaths) -> tuple[dict[str, str], dict[str, list[str]]]:
  """MSRVTT_data.json (CLIP4Clip's msrvtt_data), or the official pair train_val_videodatainfo.json +
  test_videodatainfo.json (pass both; same format, read as one).

  Format: {"videos": [{"video_id": "video0", "split": "train" | "validate" | "test", "category": 9,
  "url": ..., "start time": 137.72, "end time": 149.44, "id": 0}, ...],
  "sentences": [{"video_id": "video0", "caption": "a man ...", "sen_id": 0}, ...]} with 10,000 videos
  (6,513 train / 497 validate / 2,990 test) and 20 captions per video. The "start time"/"end time" locate the
  clip in the YouTube original; the released mp4 is already that clip, so they are not used.

  Returns ({video_id: our split name}, {video_id: captions in file order}).
  """
  splits: dict[str, str] = {}
  captions: dict[str, list[str]] = {}
  for path in _paths(paths):
    data = _load_json(path)
    for i, video in enumerate(_get(data, "videos", str(path))):
      where = f"{path}: videos[{i}]"
      vid, split = _get(video, "video_id", where), _get(video, "split", where)
      if split not in MSRVTT_SPLITS:
        raise AnnotationError(f"{where}: unknown split {split!r} (expected one of {sorted(MSRVTT_SPLITS)})")
      if vid in splits:
        raise AnnotationError(f"{where}: video {vid!r} listed twice")
      splits[vid] = MSRVTT_SPLITS[split]
    for i, sentence in enumerate(_get(data, "sentences", str(path))):
      where = f"{path}: sentences[{i}]"
      vid = _get(sentence, "video_id", where)
      captions.setdefault(vid, []).append(_clean(_get(sentence, "caption", where), where))
  unknown = sorted(set(captions) - set(splits))
  if unknown:
    raise AnnotationError(f"{[str(p) for p in _paths(paths)]}: sentences name video(s) absent from 'videos', "
                          f"e.g. {unknown[:3]}")
  return splits, captions


def _read_csv_rows(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
  with text_file(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
      raise AnnotationError(f"{path}: missing column(s) {missing} (header: {reader.fieldnames})")
    return list(reader)


def parse_msrvtt_jsfusion_test(path: str | os.PathLike) -> list[Clip]:
  """MSRVTT_JSFUSION_test.csv: the 1k-A test split (1,000 videos, one caption each).

  Format: CSV with header `key,vid_key,video_id,sentence`, e.g. `ret0,msr9770,video9770,a person is ...`.
  """
  clips = []
  for i, row in enumerate(_read_csv_rows(path, ("video_id", "sentence"))):
    where = f"{path}: row {i + 2}"
    clips.append(_clip(row["video_id"], row["video_id"], [_clean(row["sentence"], where)], "test", where))
  _check_unique(clips, path)
  return clips


def parse_msrvtt_split_csv(csv_path: str | os.PathLike, data_json: PathOrPaths, split: str) -> list[Clip]:
  """A CSV listing video ids (column `video_id`: MSRVTT_train.9k.csv, MSRVTT_train.7k.csv, *.full.csv) with
  all captions of each video from MSRVTT_data.json (20 per video)."""
  _, captions = read_msrvtt_data_json(data_json)
  clips = []
  for i, row in enumerate(_read_csv_rows(csv_path, ("video_id",))):
    vid, where = row["video_id"], f"{csv_path}: row {i + 2}"
    if vid not in captions:
      raise AnnotationError(f"{where}: video {vid!r} has no caption in {[str(p) for p in _paths(data_json)]}")
    clips.append(_clip(vid, vid, captions[vid], split, where))
  _check_unique(clips, csv_path)
  return clips


def parse_msrvtt_official(data_json: PathOrPaths, splits: Sequence[str] = ("train", "val", "test"),
                          rename: dict[str, str] | None = None) -> list[Clip]:
  """The official split of MSRVTT_data.json: train 6,513 / val 497 / test 2,990 videos, all captions.

  `splits` keeps only those (our names); `rename` maps them to the output split (e.g. {"val": "train"} for
  the 7k training set = official train + validate).
  """
  video_splits, captions = read_msrvtt_data_json(data_json)
  rename = rename or {}
  clips = []
  for vid, split in video_splits.items():
    if split in splits:
      clips.append(_clip(vid, vid, captions.get(vid, []), rename.get(split, split), f"MSR-VTT video {vid!r}"))
  return clips


# ----------------------------------------------------------------------------------------------------- DiDeMo

def parse_didemo(path: str | os.PathLike, split: str) -> list[Clip]:
  """DiDeMo (LocalizingMoments) train_data.json / val_data.json / test_data.json as one clip per video.

  Format: a JSON list of moments {"annotation_id": 1, "description": "the girl ...",
  "video": "91414520@N00_4446149953_e3a8b97d2c.mov", "times": [[2, 2], [2, 3], ...],
  "dl_link": ..., ...}; `times` are 5-second segment indices (0..5) from several annotators.
  Sentences of a video are ordered by their mean start then mean end segment (stable for ties), so the
  joined paragraph reads in temporal order; the clip is the whole video (paragraph-to-video retrieval).
  """
  moments = _load_json(path)
  if not isinstance(moments, list):
    raise AnnotationError(f"{path}: expected a JSON list of moments, got {type(moments).__name__}")
  by_video: dict[str, list[tuple[float, float, int, str]]] = {}
  for i, moment in enumerate(moments):
    where = f"{path}: [{i}]"
    video, times = _get(moment, "video", where), _get(moment, "times", where)
    description = _clean(_get(moment, "description", where), where)
    if not times or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in times):
      raise AnnotationError(f"{where}: 'times' must be a non-empty list of [start, end] pairs, got {times!r}")
    start = sum(t[0] for t in times) / len(times)
    end = sum(t[1] for t in times) / len(times)
    by_video.setdefault(video, []).append((start, end, i, description))
  clips = []
  for video, sentences in by_video.items():
    ordered = [s[3] for s in sorted(sentences)]
    clips.append(_clip(video, video, ordered, split, f"{path}: video {video!r}"))
  return clips


# ------------------------------------------------------------------------------------------------ ActivityNet

def parse_activitynet(path: str | os.PathLike, split: str) -> list[Clip]:
  """ActivityNet Captions train.json / val_1.json / val_2.json as one clip per video.

  Format: {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], ...],
  "sentences": ["A young woman is seen ...", ...]}, ...}; video files are named `v_<youtube id>.mp4` (some
  mirrors drop the `v_`). Sentences are ordered by start time (stable), the clip is the whole video.
  """
  data = _load_json(path)
  if not isinstance(data, dict):
    raise AnnotationError(f"{path}: expected a JSON object keyed by video id, got {type(data).__name__}")
  clips = []
  for video, entry in data.items():
    where = f"{path}: {video!r}"
    sentences, timestamps = _get(entry, "sentences", where), _get(entry, "timestamps", where)
    if not isinstance(sentences, list) or not isinstance(timestamps, list) or len(sentences) != len(timestamps):
      raise AnnotationError(f"{where}: 'sentences' and 'timestamps' must be lists of the same length")
    order = sorted(range(len(sentences)), key=lambda k: (float(timestamps[k][0]), k))
    clips.append(_clip(video, video, [_clean(sentences[k], where) for k in order], split, where))
  return clips


# ------------------------------------------------------------------------------------------------------ LSMDC

def parse_lsmdc(path: str | os.PathLike, split: str) -> list[Clip]:
  """LSMDC16_annos_training.csv / LSMDC16_annos_val.csv / LSMDC16_challenge_1000_publictect.csv.

  Format: tab-separated, no header, six fields: clip name, start_aligned, end_aligned, start_extracted,
  end_extracted, sentence; e.g. `0001_American_Beauty_00.00.51.926-00.00.54.129<TAB>...<TAB>SOMEONE ...`.
  Each clip is its own video file `<movie>/<clip name>.avi`, so no start/end is kept. A clip name that
  occurs on several lines gets all their sentences.
  """
  by_clip: dict[str, list[str]] = {}
  with text_file(path) as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split("\t", 5)
      if len(fields) != 6:
        raise AnnotationError(f"{path}: line {n}: expected 6 tab-separated fields, got {len(fields)}")
      by_clip.setdefault(fields[0], []).append(_clean(fields[5], f"{path}: line {n}"))
  return [_clip(name, name, sentences, split, f"{path}: {name!r}") for name, sentences in by_clip.items()]


# ------------------------------------------------------------------------------------------------------- MSVD

class _PlainDataUnpickler(pickle.Unpickler):
  """Unpickles only built-in containers and strings: raw-captions.pkl needs nothing else, and refusing
  globals means a tampered file cannot run code."""

  def find_class(self, module: str, name: str) -> Any:
    raise AnnotationError(f"raw-captions.pkl refers to {module}.{name}; only dicts, lists and strings are allowed")


def read_msvd_captions(path: str | os.PathLike) -> dict[str, list[str]]:
  """raw-captions.pkl (CLIP4Clip / CLIP2Video msvd_data): {video_id: [[word, word, ...], ...]}.

  Video ids are YouTube clip names such as `-4wsuPCjDBc_5_15` (video file `YouTubeClips/<id>.avi`); each
  caption is a list of tokens, joined with spaces as the originals do (~40 captions per video).
  """
  with open(path, "rb") as f:
    try:
      data = _PlainDataUnpickler(io.BytesIO(f.read())).load()
    except (pickle.UnpicklingError, EOFError) as e:
      raise AnnotationError(f"{path}: not a readable pickle ({e})") from e
  if not isinstance(data, dict):
    raise AnnotationError(f"{path}: expected a dict of video id -> captions, got {type(data).__name__}")
  captions = {}
  for vid, caps in data.items():
    where = f"{path}: {vid!r}"
    if not isinstance(caps, list):
      raise AnnotationError(f"{where}: expected a list of captions, got {type(caps).__name__}")
    captions[vid] = [_clean(" ".join(c) if isinstance(c, list) else c, where) for c in caps]
  return captions


def parse_msvd(captions_pkl: str | os.PathLike, list_txt: str | os.PathLike, split: str) -> list[Clip]:
  """One MSVD split: the ids of train_list.txt (1,200) / val_list.txt (100) / test_list.txt (670), all
  captions from raw-captions.pkl."""
  captions = read_msvd_captions(captions_pkl)
  clips = []
  for vid in read_id_list(list_txt):
    if vid not in captions:
      raise AnnotationError(f"{list_txt}: video {vid!r} has no caption in {captions_pkl}")
    clips.append(_clip(vid, vid, captions[vid], split, f"{captions_pkl}: {vid!r}"))
  return clips


# ------------------------------------------------------------------------------------------------------ VATEX

def read_vatex_captions(paths: Sequence[str | os.PathLike]) -> dict[str, list[str]]:
  """English captions of VATEX from any mix of:

  * the official vatex_training_v1.0.json / vatex_validation_v1.0.json / vatex_public_test_english_v1.1.json:
    a JSON list of {"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [10 sentences], "chCap": [...]};
  * CLIP2Video's vatex_data.json: {"<videoID>": {"enCap": [...], ...}, ...}.

  videoID is `<youtube id>_<start>_<end>` (seconds, 6 digits); the video file is `<videoID>.mp4`.
  """
  captions: dict[str, list[str]] = {}
  for path in paths:
    data = _load_json(path)
    if isinstance(data, list):
      entries = [(_get(e, "videoID", f"{path}: [{i}]"), e, f"{path}: [{i}]") for i, e in enumerate(data)]
    elif isinstance(data, dict):
      entries = [(vid, e, f"{path}: {vid!r}") for vid, e in data.items()]
    else:
      raise AnnotationError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
    for vid, entry, where in entries:
      en = _get(entry, "enCap", where)
      if not isinstance(en, list):
        raise AnnotationError(f"{where}: 'enCap' must be a list of sentences")
      if vid in captions:
        raise AnnotationError(f"{where}: video {vid!r} appears in more than one caption file")
      captions[vid] = [_clean(c, where) for c in en]
  return captions


def parse_vatex(caption_files: Sequence[str | os.PathLike], split: str,
                list_txt: str | os.PathLike | None = None) -> list[Clip]:
  """One VATEX split. With `list_txt` (CLIP2Video's train_list.txt: 25,991 ids; test_list.txt: the 1,500-video
  test half of the official validation set) only those ids, in list order; without it every video of the
  caption files."""
  captions = read_vatex_captions(caption_files)
  ids = read_id_list(list_txt) if list_txt is not None else list(captions)
  clips = []
  for vid in ids:
    if vid not in captions:
      raise AnnotationError(f"{list_txt}: video {vid!r} has no English caption in {[str(p) for p in caption_files]}")
    clips.append(_clip(vid, vid, captions[vid], split, f"VATEX {vid!r}"))
  return clips


def _check_unique(clips: Sequence[Clip], path: str | os.PathLike) -> None:
  seen: set[str] = set()
  for clip in clips:
    if clip["clip_id"] in seen:
      raise AnnotationError(f"{path}: clip {clip['clip_id']!r} listed more than once")
    seen.add(clip["clip_id"])
