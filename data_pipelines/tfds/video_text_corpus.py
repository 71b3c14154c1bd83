"""A pretraining-scale video-text corpus (HD-VILA-100M, WebVid, ...) as a TFDS dataset, built by Apache Beam.

Input: JSON-lines annotation files in the build_shards format, one clip per line,

  {"clip_id": "abc_0003", "video": "abc.mp4", "captions": [], "subtitle": "ASR text", "caption": "OFA caption",
   "start": 12.0, "end": 19.5, "split": "train"}

(see data_pipelines/clip_annotation.py; `video` is relative to `videos_dir`), and the videos. Output: the same
clip records as build_shards and the benchmark builders, in ArrayRecord files that `tfds.data_source` and the
Grain pipeline read. Decoding runs as a Beam job, so 100M clips is a matter of workers, not of a home-made
scheduler; the builder's config says where the annotations and videos are:

  VideoTextCorpusConfig(name="hdvila", annotations="gs://bucket/hdvila/ann-*.jsonl", videos_dir="/mnt/hdvila",
                        splits=("train",), fps=5.0, short_side=224)

Empty `annotations` / `videos_dir` mean `<manual_dir>/annotations.jsonl` / `<manual_dir>`.

Launching (build_corpus.py makes the config from flags; everything after `--` goes to Beam):

  # local, a small set (DirectRunner, multi-process)
  python -m data_pipelines.tfds.build_corpus --name demo --annotations ann.jsonl --videos-dir videos/ \\
      --data-dir ~/tensorflow_datasets -- --runner=DirectRunner --direct_num_workers=8 \\
      --direct_running_mode=multi_processing

  # Google Cloud Dataflow. Workers need this package and its decoding dependencies:
  #   pip wheel --no-deps -w dist .   and a requirements file listing av, pillow, msgpack, array-record,
  #   tensorflow-datasets (never tensorflow). Videos must be readable by path on every worker: a Filestore/NFS
  #   mount or gcsfuse in a custom worker container (--sdk_container_image); PyAV opens local paths.
  python -m data_pipelines.tfds.build_corpus --name hdvila --annotations 'gs://B/hdvila/ann-*.jsonl' \\
      --videos-dir /mnt/hdvila --data-dir gs://B/tfds --splits train -- \\
      --runner=DataflowRunner --project=P --region=us-central1 --temp_location=gs://B/tmp \\
      --extra_packages=dist/clipvip_jax-0.1.0-py3-none-any.whl --requirements_file=beam-requirements.txt \\
      --machine_type=n2-highcpu-16 --max_num_workers=500 --experiments=use_runner_v2

  # Apache Flink (a running cluster; the SDK harness in Docker containers with the same packages)
  python -m data_pipelines.tfds.build_corpus ... -- --runner=FlinkRunner --flink_master=HOST:8081 \\
      --environment_type=DOCKER --environment_config=REGISTRY/clip-beam-worker:latest --parallelism=256

  # Apache Spark (a Spark master; Beam's portable Spark runner)
  python -m data_pipelines.tfds.build_corpus ... -- --runner=SparkRunner --spark_master_url=spark://HOST:7077 \\
      --environment_type=DOCKER --environment_config=REGISTRY/clip-beam-worker:latest

From Python: `VideoTextCorpus(config=..., data_dir=...).download_and_prepare(download_config=
tfds.download.DownloadConfig(beam_options=PipelineOptions([...])))`; read with
`TfdsRecordSource("video_text_corpus/hdvila", "train", data_dir=...)`.

Skipped inputs (bad lines, unknown splits, duplicate ids, missing or corrupt videos) are listed in
`skipped-<split>-NNNNN-of-MMMMM.jsonl` in the dataset folder and counted in Beam counters (see beam_clips.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines.tfds.common import ClipBuilderConfig, ClipInfoBuilder, MissingManualFilesError

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclasses.dataclass(eq=False)
class VideoTextCorpusConfig(ClipBuilderConfig):
  """annotations: JSON-lines file or glob (local or any Beam filesystem: gs://, s3://, hdfs://); "" =
    <manual_dir>/annotations.jsonl.
  videos_dir: folder that relative `video` paths are resolved against, as seen by the workers; "" = manual dir.
  splits: the splits to build; an annotation's "split" (default `default_split`) must be one of them, or the
    line is reported as skipped.
  """
  annotations: str = ""
  videos_dir: str = ""
  splits: tuple[str, ...] = ("train",)
  default_split: str = "train"

  def __post_init__(self):
    bad = [s for s in (*self.splits, self.default_split) if not _SPLIT_NAME.match(s)]
    if bad or not self.splits:
      raise ValueError(f"VideoTextCorpusConfig {self.name!r}: splits must be non-empty names matching "
                       f"[A-Za-z0-9_]+, got splits={self.splits!r} default_split={self.default_split!r}")


class VideoTextCorpus(ClipInfoBuilder):
  """Any video-text corpus given as build_shards JSON lines, generated with Apache Beam (see module doc)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Either give the config explicit `annotations` and `videos_dir`, or put `annotations.jsonl` (build_shards
format: {"clip_id", "video", "captions", "subtitle"?, "caption"?, "start"?, "end"?, "split"?} per line) in
the manual directory with the videos under it (`video` paths relative to the manual directory).
"""
  DESCRIPTION = "A video-text corpus (clips with captions, ASR subtitles and auxiliary captions)."
  BUILDER_CONFIGS = [VideoTextCorpusConfig(name="default")]

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    config: VideoTextCorpusConfig = self.builder_config
    # dl_manager.manual_dir is only touched when needed: it raises when no manual dir was given.
    annotations = config.annotations or os.fspath(dl_manager.manual_dir / "annotations.jsonl")
    videos_dir = config.videos_dir or os.fspath(dl_manager.manual_dir)
    from apache_beam.io.filesystems import FileSystems  # deferred: registering the builder needs no Beam
    matched = FileSystems.match([annotations])[0].metadata_list
    if not matched:
      raise MissingManualFilesError(f"video_text_corpus: no annotation file matches {annotations!r}.\n\n"
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(annotations=annotations, split=split, videos_dir=videos_dir)
            for split in config.splits}

  def _generate_examples(self, annotations: str, split: str, videos_dir: str) -> Any:
    from data_pipelines.tfds import beam_clips  # deferred: imports apache_beam

    config: VideoTextCorpusConfig = self.builder_config
    # self.data_dir is TFDS's temporary folder during the build; it becomes the dataset folder on success.
    return beam_clips.ClipExamples(annotations, split, config.splits, config.default_split, videos_dir,
                                   config.frame_options(), beam_clips.skipped_prefix(os.fspath(self.data_dir), split))
