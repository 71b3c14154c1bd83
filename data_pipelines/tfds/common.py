"""What every clip dataset builder shares: the features, the config, the manual directory, the example loop.

Stored form. A TFDS example is {"clip_id": Text, "record": bytes}, where "record" is exactly the msgpack clip
record of `data_pipelines.records` (the bytes build_shards writes into its own shards). TFDS's own per-field
features (Video, Sequence of Image) would need TensorFlow to encode and decode; a bytes Tensor needs neither,
so `file_format="array_record"` builds and `tfds.data_source` reads with TensorFlow absent, and the Grain
pipeline decodes both kinds of shard with the same `records.decode_record`. `TfdsRecordSource` is that
pipeline's view of a prepared split: `len()` and `[i] -> record bytes`.

Frames. Each clip goes through `shard_writer.clip_to_record_or_reason`, i.e. `video_io.read_clip` with the
config's `FrameOptions` (fps, short side, JPEG quality): a clip is stored identically whether build_shards,
a builder here or its Beam job wrote it. The options are part of the config, so they land in the dataset's
metadata.json; build another rate as another config (`ClipBuilderConfig(name="9k_fps1", fps=1.0)`).

Bad inputs. A video that is missing from the manual directory, empty, truncated or undecodable is skipped,
counted and logged; its reason goes to `skipped-<split>.jsonl` in the dataset folder and the per-split counts
to metadata.json ("num_skipped"). Only a split that loses every clip fails the build (TFDS cannot write an
empty split, and an empty benchmark is a setup error worth stopping for).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import json
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from data_pipelines import worker_pool
from data_pipelines.annotations import Clip, join_paragraph
from data_pipelines.clip_annotation import AnnotationLineError, ClipAnnotation, parse_annotation
from data_pipelines.records import ClipRecord, encode_record
from data_pipelines.shard_writer import clip_to_record_or_reason
from data_pipelines.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, FrameOptions

CLIP_FEATURES_DOC = "clip_id: the clip's id; record: msgpack clip record (data_pipelines.records.decode_record)"


def clip_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "clip_id": tfds.features.Text(),
      "record": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


@dataclasses.dataclass(eq=False)
class ClipBuilderConfig(tfds.core.BuilderConfig):
  """A builder config: which split scheme / text form (per dataset) and how frames are stored.

  scheme: the dataset's split scheme ("9k", "7k", "full" for MSR-VTT; "" where a dataset has one), kept
    apart from `name` so a custom config ("9k_fps1") can pick any scheme.
  fps, short_side, jpeg_quality, folder_fps: `video_io.FrameOptions` (defaults: 5 fps, short side 224,
    quality 90; folder_fps is the rate of frame-image folders, 0 = unknown).
  paragraph: store one caption per clip, all sentences joined with spaces (DiDeMo / ActivityNet
    paragraph-to-video retrieval), instead of one caption per sentence.
  """
  scheme: str = ""
  fps: float = 5.0
  short_side: int = 224
  jpeg_quality: int = 90
  folder_fps: float = 0.0
  paragraph: bool = False

  def frame_options(self) -> FrameOptions:
    return FrameOptions(fps=self.fps, short_side=self.short_side, jpeg_quality=self.jpeg_quality,
                        folder_fps=self.folder_fps)


class MissingManualFilesError(FileNotFoundError):
  """The manual directory lacks official files; the message lists each one and where it was looked for."""


def _video_stem(name: str) -> str:
  root, ext = os.path.splitext(name)
  return root if ext.lower() in VIDEO_EXTENSIONS else name


class ManualDir:
  """An index of everything under a builder's manual directory, built with one walk.

  Official archives unpack into different nestings (msrvtt_data/MSRVTT_data.json, MSRVTT/videos/all/,
  TrainValVideo/ + TestVideo/, LSMDC's one folder per movie), so files are found by name anywhere under the
  root rather than at fixed paths. Symlinked folders are followed (a common way to point a manual directory
  at videos stored elsewhere). When a name occurs twice, the shallowest path (then the first in sorted order)
  wins, so the choice is deterministic.

  Videos are indexed by file name and by name without extension (annotation files name videos by id:
  "video7010", "v_QOlSCBRmfWY"); a folder holding image files is indexed by its name as a frame folder.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    if not self.root.is_dir():
      raise MissingManualFilesError(f"manual directory {self.root} does not exist")
    files: dict[str, tuple[int, str]] = {}
    videos: dict[str, tuple[int, str]] = {}

    def keep(table: dict[str, tuple[int, str]], key: str, depth: int, path: str) -> None:
      if key not in table or (depth, path) < table[key]:
        table[key] = (depth, path)

    seen_dirs = set()
    for folder, dirnames, filenames in os.walk(self.root, followlinks=True):
      real = os.path.realpath(folder)
      if real in seen_dirs:  # a symlink loop or a folder linked twice
        dirnames[:] = []
        continue
      seen_dirs.add(real)
      dirnames.sort()
      depth = len(pathlib.Path(folder).relative_to(self.root).parts)
      has_images = False
      for name in sorted(filenames):
        path = os.path.join(folder, name)
        keep(files, name, depth, path)
        lower = name.lower()
        if lower.endswith(VIDEO_EXTENSIONS):
          keep(videos, name, depth, path)
          keep(videos, _video_stem(name), depth, path)
        has_images = has_images or lower.endswith(IMAGE_EXTENSIONS)
      if has_images and depth > 0:
        keep(videos, os.path.basename(folder), depth, folder)
    self._files = {k: v[1] for k, v in files.items()}
    self._videos = {k: v[1] for k, v in videos.items()}

  def find(self, name: str) -> pathlib.Path | None:
    path = self._files.get(name)
    return pathlib.Path(path) if path else None

  def require(self, names: Sequence[str], dataset: str, instructions: str = "") -> dict[str, pathlib.Path]:
    """{name: path} of official files that must all be present; else one error listing every missing one."""
    found = {name: self.find(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
      raise MissingManualFilesError(
          f"{dataset}: missing official file(s) {missing}: looked for them by name anywhere under the manual "
          f"directory {self.root}." + (f"\n\n{instructions.strip()}" if instructions else ""))
    return {name: path for name, path in found.items() if path is not None}

  def video(self, names: Sequence[str]) -> str | None:
    """Path of the first of `names` (a name, or a name without its video extension) that is indexed."""
    for name in names:
      for key in (name, _video_stem(name)):
        if key in self._videos:
          return self._videos[key]
    return None


def _convert(annotation: ClipAnnotation, options: FrameOptions) -> tuple[ClipRecord | None, str | None]:
  # `video` is already an absolute path (resolved by ManualDir), so the videos dir is unused.
  return clip_to_record_or_reason(annotation, "", options)


def convert_clips(annotations: Sequence[ClipAnnotation], options: FrameOptions,
                  num_workers: int) -> Iterator[tuple[ClipAnnotation, ClipRecord | None, str | None]]:
  """(annotation, record or None, skip reason or None) per annotation, in order; decoding in `num_workers`
  processes (spawned: no forked JAX/threads state) when num_workers > 1."""
  convert = functools.partial(_convert, options=options)
  if num_workers <= 1 or len(annotations) <= 1:
    for annotation in annotations:
      yield (annotation, *convert(annotation))
    return
  with worker_pool.spawn_pool(min(num_workers, len(annotations))) as pool:  # Ctrl-C: the parent's alone
    for annotation, (record, reason) in zip(annotations, pool.imap(convert, annotations, chunksize=2)):
      yield annotation, record, reason


class ClipInfoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Features, metadata and the ArrayRecord default shared by every clip builder (generator or Beam)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Clip records (msgpack, JPEG frames) in ArrayRecord; no TensorFlow needed."}
  HOMEPAGE = ""
  CITATION = ""
  DESCRIPTION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 probes `importlib_resources` (a dependency only below Python 3.9) for any builder defined
    # in a package, and fails with ModuleNotFoundError on 3.11; the class's own file is what it would return.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs: Any):
    # ArrayRecord gives the random access Grain needs, and TFDS writes it without TensorFlow (TFRecord
    # writing would import it).
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _metadata(self) -> dict[str, Any]:
    config: ClipBuilderConfig = self.builder_config
    return {"frame_options": dataclasses.asdict(config.frame_options()),
            "text": "paragraph" if config.paragraph else "sentences"}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DESCRIPTION}\n\nFeatures: {CLIP_FEATURES_DOC}.",
        features=clip_features(),
        homepage=self.HOMEPAGE or None,
        citation=self.CITATION or None,
        metadata=tfds.core.MetadataDict(**self._metadata()),
    )


class ClipDatasetBuilder(ClipInfoBuilder, skip_registration=True):
  """Base of the benchmark builders: subclasses say which clips each split holds (`_clips_by_split`) and,
  when the annotation names videos differently from the files, which names to look up (`_video_names`)."""

  def __init__(self, *, num_workers: int | None = None, **kwargs: Any):
    """num_workers: decoding processes (default: all CPUs); the output does not depend on it. Above 1 the
    workers are spawned, so a script that builds must do so under `if __name__ == "__main__":`."""
    self._num_workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    super().__init__(**kwargs)

  def _metadata(self) -> dict[str, Any]:
    return {**super()._metadata(), "num_skipped": {}}

  @abc.abstractmethod
  def _clips_by_split(self, manual: ManualDir) -> dict[str, list[Clip]]:
    """{split: clips (annotations.py dicts)} from the official files found in `manual`."""

  def _video_names(self, clip: Clip) -> list[str]:
    return [clip["video"]]

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    manual = ManualDir(dl_manager.manual_dir)
    clips_by_split = self._clips_by_split(manual)
    return {split: self._generate_examples(split, clips, manual) for split, clips in clips_by_split.items()}

  def _annotation(self, clip: Clip, split: str, path: str) -> ClipAnnotation:
    captions = clip["captions"]
    if self.builder_config.paragraph:
      captions = [join_paragraph(captions)]
    where = f"{self.name} {split} clip {clip['clip_id']!r}"
    fields = {k: clip[k] for k in ("start", "end") if clip.get(k) is not None}
    return parse_annotation({"clip_id": clip["clip_id"], "video": path, "captions": captions, "split": split,
                             **fields}, where)

  def _generate_examples(self, split: str, clips: Sequence[Clip], manual: ManualDir
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    skipped: list[dict[str, Any]] = []
    annotations = []
    official_name = {clip["clip_id"]: clip["video"] for clip in clips}
    for clip in clips:
      path = manual.video(self._video_names(clip))
      if path is None:
        skipped.append({"clip_id": clip["clip_id"], "video": clip["video"],
                        "reason": f"video not found under {manual.root} (looked for {self._video_names(clip)})"})
        continue
      try:
        annotations.append(self._annotation(clip, split, path))
      except AnnotationLineError as e:
        skipped.append({"clip_id": clip["clip_id"], "video": clip["video"], "reason": str(e)})
    written = 0
    for annotation, record, reason in convert_clips(annotations, self.builder_config.frame_options(),
                                                    self._num_workers):
      if record is not None:
        try:
          example = {"clip_id": record.clip_id, "record": encode_record(record)}
        except ValueError as e:
          record, reason = None, str(e)
      if record is None:
        skipped.append({"clip_id": annotation.clip_id, "video": official_name[annotation.clip_id],
                        "path": annotation.video, "reason": reason})
        logging.warning("%s %s: skipped clip %r (%s): %s", self.name, split, annotation.clip_id,
                        annotation.video, reason)
        continue
      written += 1
      yield record.clip_id, example
    self._report_skipped(split, skipped, written, len(clips))

  def _report_skipped(self, split: str, skipped: list[dict[str, Any]], written: int, total: int) -> None:
    # self.data_dir is TFDS's temporary folder during the build; it becomes the dataset folder on success.
    with open(os.path.join(self.data_dir, f"skipped-{split}.jsonl"), "w", encoding="utf-8") as f:
      for entry in skipped:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    self.info.metadata["num_skipped"][split] = len(skipped)
    logging.info("%s %s: %d of %d clips written, %d skipped (skipped-%s.jsonl)", self.name, split, written,
                 total, len(skipped), split)
    if written == 0:
      reasons = "; ".join(f"{s['clip_id']}: {s['reason']}" for s in skipped[:3])
      raise RuntimeError(f"{self.name} split {split!r}: all {total} clips were skipped (e.g. {reasons})")


class TfdsRecordSource:
  """The clip-record bytes of one split of a prepared dataset: `len()` and `[i] -> bytes` for the Grain
  pipeline (`records.decode_record` reads them). Picklable: each worker process opens the files itself.

  `name` is a registered name with optional config ("msrvtt/9k", looked up in `data_dir`) or the path of a
  prepared dataset version folder (".../msrvtt/9k/1.0.0").
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self._source = None

  def _open(self):
    if self._source is None:
      if os.path.isfile(os.path.join(self.name, "dataset_info.json")):
        self._source = tfds.builder_from_directory(self.name).as_data_source(split=self.split)
      else:
        self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
    return self._source

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> bytes:
    return self._open()[int(index)]["record"]

  def __getstate__(self) -> dict[str, Any]:
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir, "_source": None}

  def __repr__(self) -> str:
    return f"TfdsRecordSource({self.name!r}, split={self.split!r}, data_dir={str(self.data_dir)!r})"


def prepare(builder: tfds.core.DatasetBuilder, download_config: tfds.download.DownloadConfig) -> bool:
  """download_and_prepare, unless the dataset (name/config/version, which the frame options name) is already
  complete in the data dir: then nothing is read or written and False comes back, so a relaunched finished build
  (a scheduler re-running a job that had in fact finished) is a no-op the commands report as complete."""
  if builder.is_prepared():
    return False
  builder.download_and_prepare(download_config=download_config)
  return True
