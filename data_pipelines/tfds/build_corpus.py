"""Command line of the Beam build of a video-text corpus (see video_text_corpus.py for the launch commands on
Dataflow, Flink and Spark): flags make the VideoTextCorpusConfig, everything after `--` goes to Beam.

  python -m data_pipelines.tfds.build_corpus --name demo --annotations ann.jsonl --videos-dir videos/ \
      --data-dir ~/tensorflow_datasets -- --runner=DirectRunner --direct_num_workers=8 \
      --direct_running_mode=multi_processing

A separate module from the builder, so `python -m` never defines (and registers) the builder class twice.
Run again on a finished dataset, it reads and writes nothing, says the dataset is complete and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from data_pipelines.tfds.common import prepare
from data_pipelines.tfds.video_text_corpus import VideoTextCorpus, VideoTextCorpusConfig


def main(argv: Sequence[str] | None = None) -> None:
  args = list(sys.argv[1:] if argv is None else argv)
  beam_args = args[args.index("--") + 1:] if "--" in args else []
  own_args = args[:args.index("--")] if "--" in args else args
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.tfds.build_corpus",
                                   description="Build a video-text corpus as a TFDS dataset with Apache Beam; "
                                               "arguments after -- go to Beam (runner and its options).")
  parser.add_argument("--name", required=True, help="config name: the dataset is video_text_corpus/NAME")
  parser.add_argument("--annotations", required=True, help="JSON-lines file or glob (gs://... works)")
  parser.add_argument("--videos-dir", required=True, help="root of relative video paths, as seen by workers")
  parser.add_argument("--data-dir", required=True, help="TFDS data dir that receives the dataset")
  parser.add_argument("--splits", default="train", help="comma-separated splits to build")
  parser.add_argument("--default-split", default="train")
  parser.add_argument("--fps", type=float, default=5.0)
  parser.add_argument("--short-side", type=int, default=224)
  parser.add_argument("--jpeg-quality", type=int, default=90)
  parser.add_argument("--folder-fps", type=float, default=0.0)
  args_ns = parser.parse_args(own_args)
  from apache_beam.options.pipeline_options import PipelineOptions

  config = VideoTextCorpusConfig(
      name=args_ns.name, annotations=args_ns.annotations, videos_dir=args_ns.videos_dir,
      splits=tuple(s.strip() for s in args_ns.splits.split(",") if s.strip()), default_split=args_ns.default_split,
      fps=args_ns.fps, short_side=args_ns.short_side, jpeg_quality=args_ns.jpeg_quality,
      folder_fps=args_ns.folder_fps)
  builder = VideoTextCorpus(config=config, data_dir=args_ns.data_dir)
  built = prepare(builder, tfds.download.DownloadConfig(
      beam_options=PipelineOptions(beam_args or ["--runner=DirectRunner"])))
  print(f"{builder.name}/{config.name}: {builder.data_dir}"
        + ("" if built else " is complete (built earlier); nothing to do"))
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} clips")


if __name__ == "__main__":
  main()
