"""The Apache Beam half of `video_text_corpus`: JSON-lines annotations in, TFDS examples of clip records out.

Kept apart from the builder module so that registering the builders never imports apache_beam; TFDS imports
this only when the Beam build runs.

Per split the transform is: read every annotation line (ReadFromTextWithFilename, split into ranges across
workers) -> validate it with `clip_annotation.parse_annotation` -> keep this split's clips -> group by
clip_id (a clip id repeated in the corpus keeps the line that sorts first, so reruns choose the same one; the
shuffle also spreads the decode work evenly over workers) -> `shard_writer.clip_to_record_or_reason` ->
(clip_id, {"clip_id", "record"}) for TFDS's writer. Everything that is not written — a malformed line, a clip of
a split the config does not build, a duplicate id, a missing or corrupt video — becomes one JSON line in
`skipped-<split>-*.jsonl` in the dataset folder and a Beam counter (namespace "video_text_corpus"), so a
100M-clip job never stops for one bad input and never drops one silently. Lines with problems that concern
no particular split (bad JSON, unknown split) are reported by the first split's transform only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam

from data_pipelines.clip_annotation import AnnotationLineError, parse_annotation
from data_pipelines.records import encode_record
from data_pipelines.shard_writer import clip_to_record_or_reason
from data_pipelines.video_io import FrameOptions

_NAMESPACE = "video_text_corpus"
_SKIPPED = "skipped"


def _counter(name: str) -> beam.metrics.metricbase.Counter:
  return beam.metrics.Metrics.counter(_NAMESPACE, name)


def _skip(entry: dict[str, Any], counter: str) -> beam.pvalue.TaggedOutput:
  _counter(counter).inc()
  logging.warning("video_text_corpus: skipped %s", entry)
  return beam.pvalue.TaggedOutput(_SKIPPED, json.dumps(entry, ensure_ascii=False))


class _ParseLine(beam.DoFn):
  """(file, line) -> (clip_id, line) for this split's clips; problems go to the skipped output."""

  def __init__(self, split: str, splits: Sequence[str], default_split: str, report_unsplit: bool):
    self._split, self._splits, self._default_split = split, tuple(splits), default_split
    self._report_unsplit = report_unsplit

  def process(self, element: tuple[str, str]) -> Iterator[Any]:
    filename, line = element
    if not line.strip():
      return
    try:
      annotation = parse_annotation(json.loads(line), filename, self._default_split)
    except (json.JSONDecodeError, AnnotationLineError) as e:
      if self._report_unsplit:
        yield _skip({"file": filename, "line": line[:500], "reason": f"bad annotation line: {e}"},
                    "bad_annotation_lines")
      return
    if annotation.split == self._split:
      yield annotation.clip_id, line
    elif annotation.split not in self._splits and self._report_unsplit:
      yield _skip({"clip_id": annotation.clip_id, "video": annotation.video,
                   "reason": f"split {annotation.split!r} is not one the config builds {list(self._splits)}"},
                  "clips_in_unbuilt_splits")


class _DecodeClip(beam.DoFn):
  """(clip_id, [lines]) -> (clip_id, example) or a skipped entry per problem."""

  def __init__(self, videos_dir: str, options: FrameOptions, default_split: str):
    self._videos_dir, self._options, self._default_split = videos_dir, options, default_split

  def process(self, element: tuple[str, Sequence[str]]) -> Iterator[Any]:
    clip_id, lines = element
    first, *duplicates = sorted(lines)
    for line in duplicates:
      yield _skip({"clip_id": clip_id, "line": line[:500], "reason": "duplicate clip_id (another line kept)"},
                  "duplicate_clip_ids")
    annotation = parse_annotation(json.loads(first), clip_id, self._default_split)
    record, reason = clip_to_record_or_reason(annotation, self._videos_dir, self._options)
    if record is not None:
      try:
        example = {"clip_id": clip_id, "record": encode_record(record)}
      except ValueError as e:
        record, reason = None, str(e)
    if record is None:
      yield _skip({"clip_id": clip_id, "video": annotation.video, "reason": reason}, "skipped_videos")
      return
    _counter("clips_written").inc()
    yield clip_id, example


class ClipExamples(beam.PTransform):
  """PBegin -> PCollection of (clip_id, example) for one split; writes the split's skipped entries."""

  def __init__(self, annotations: str, split: str, splits: Sequence[str], default_split: str, videos_dir: str,
               options: FrameOptions, skipped_prefix: str):
    super().__init__()
    self._annotations, self._split, self._splits = annotations, split, tuple(splits)
    self._default_split, self._videos_dir, self._options = default_split, videos_dir, options
    self._skipped_prefix = skipped_prefix

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
    report_unsplit = self._split == self._splits[0]
    parsed = (
        pbegin
        | "ReadAnnotations" >> beam.io.ReadFromTextWithFilename(self._annotations)
        | "Parse" >> beam.ParDo(_ParseLine(self._split, self._splits, self._default_split, report_unsplit)
                                ).with_outputs(_SKIPPED, main="clips"))
    decoded = (
        parsed.clips
        | "GroupByClipId" >> beam.GroupByKey()
        | "Decode" >> beam.ParDo(_DecodeClip(self._videos_dir, self._options, self._default_split)
                                 ).with_outputs(_SKIPPED, main="examples"))
    _ = (
        (parsed[_SKIPPED], decoded[_SKIPPED])
        | "AllSkipped" >> beam.Flatten()
        | "WriteSkipped" >> beam.io.WriteToText(self._skipped_prefix, file_name_suffix=".jsonl"))
    return decoded.examples


def skipped_prefix(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, f"skipped-{split}")
