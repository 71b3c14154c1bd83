"""Build a benchmark dataset from its manual directory: the command line `tfds build` would be, without
TensorFlow (TFDS's own CLI imports it).

  python -m data_pipelines.tfds.build msrvtt/9k --manual-dir ~/data/msrvtt --data-dir ~/tensorflow_datasets
  python -m data_pipelines.tfds.build activitynet_captions --manual-dir ~/data/anet --data-dir ~/tfds --fps 1

Frame options that differ from a config's defaults make a new config named after them
(`activitynet_captions/paragraph_fps1_short224_q90`, or --config-name), so datasets built with different
options never share a folder. Prints the per-split clip and skip counts; reasons are in skipped-<split>.jsonl.
Run again on a finished dataset, it reads and writes nothing, says the dataset is complete and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import tensorflow_datasets as tfds

from data_pipelines.tfds.activitynet import ActivitynetCaptions
from data_pipelines.tfds.common import ClipBuilderConfig, ClipDatasetBuilder, prepare
from data_pipelines.tfds.didemo import Didemo
from data_pipelines.tfds.lsmdc import Lsmdc
from data_pipelines.tfds.msrvtt import Msrvtt
from data_pipelines.tfds.msvd import Msvd
from data_pipelines.tfds.vatex import Vatex

BUILDERS: dict[str, type[ClipDatasetBuilder]] = {
    cls.name: cls for cls in (Msrvtt, Didemo, ActivitynetCaptions, Lsmdc, Msvd, Vatex)}


def make_config(builder_cls: type[ClipDatasetBuilder], config_name: str | None, fps: float | None,
                short_side: int | None, jpeg_quality: int | None, new_name: str | None) -> ClipBuilderConfig:
  """The named (or default) config, with the given frame options; renamed when they change anything."""
  configs = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  name = config_name or builder_cls.DEFAULT_BUILDER_CONFIG_NAME or builder_cls.BUILDER_CONFIGS[0].name
  if name not in configs:
    raise ValueError(f"{builder_cls.name}: no config {name!r} (has {sorted(configs)})")
  base = configs[name]
  changes = {k: v for k, v in (("fps", fps), ("short_side", short_side), ("jpeg_quality", jpeg_quality))
             if v is not None and v != getattr(base, k)}
  if not changes and not new_name:
    return base
  config = dataclasses.replace(base, **changes)
  config.name = new_name or f"{name}_fps{config.fps:g}_short{config.short_side}_q{config.jpeg_quality}"
  return config


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.tfds.build", description=__doc__.split("\n")[0])
  parser.add_argument("dataset", help=f"NAME or NAME/CONFIG; names: {', '.join(sorted(BUILDERS))}")
  parser.add_argument("--manual-dir", required=True, help="folder holding the official files (see the builder doc)")
  parser.add_argument("--data-dir", required=True, help="TFDS data dir that receives the dataset")
  parser.add_argument("--num-workers", type=int, default=None, help="decoding processes (default: all CPUs)")
  parser.add_argument("--fps", type=float, default=None, help="kept frames per second (default 5)")
  parser.add_argument("--short-side", type=int, default=None, help="stored short side in pixels (default 224)")
  parser.add_argument("--jpeg-quality", type=int, default=None, help="JPEG quality of stored frames (default 90)")
  parser.add_argument("--config-name", default=None, help="name of the config the options make")
  args = parser.parse_args(argv)
  name, _, config_name = args.dataset.partition("/")
  if name not in BUILDERS:
    parser.error(f"unknown dataset {name!r}; choose from {', '.join(sorted(BUILDERS))}")
  builder_cls = BUILDERS[name]
  config = make_config(builder_cls, config_name or None, args.fps, args.short_side, args.jpeg_quality,
                       args.config_name)
  builder = builder_cls(config=config, data_dir=args.data_dir, num_workers=args.num_workers)
  built = prepare(builder, tfds.download.DownloadConfig(manual_dir=args.manual_dir))
  print(f"{builder.name}/{config.name}: {builder.data_dir}"
        + ("" if built else " is complete (built earlier with these options); nothing to do"))
  skipped = builder.info.metadata.get("num_skipped", {})
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} clips, {skipped.get(split, 0)} skipped")


if __name__ == "__main__":
  main()
