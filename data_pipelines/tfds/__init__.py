"""TFDS builders of the retrieval benchmarks and of pretraining-scale corpora, all storing clip records.

Importing this package registers the builders with TFDS:

  msrvtt (configs 9k, 7k, full), didemo (paragraph, sentences), activitynet_captions (paragraph, sentences),
  lsmdc, msvd, vatex: read the official annotation files and raw videos from a manual directory;
  video_text_corpus: any JSON-lines annotation (the build_shards format), generated with Apache Beam.

  python -m data_pipelines.tfds.build msrvtt/9k --manual-dir MANUAL_DIR --data-dir DATA_DIR   # or, in Python:

  import tensorflow_datasets as tfds
  from data_pipelines import tfds as clip_tfds   # registers the builders
  builder = clip_tfds.Msrvtt(config="9k", data_dir=DATA_DIR)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))
  source = clip_tfds.TfdsRecordSource("msrvtt/9k", "test", data_dir=DATA_DIR)   # len(), [i] -> record bytes

Datasets are written as ArrayRecord (file_format="array_record" is the default of every builder here), so
they are read without TensorFlow by `tfds.data_source` and random access works for Grain.
"""

from data_pipelines.tfds.activitynet import ActivitynetCaptions
from data_pipelines.tfds.common import (ClipBuilderConfig, ClipDatasetBuilder, ManualDir, MissingManualFilesError,
                                        TfdsRecordSource)
from data_pipelines.tfds.didemo import Didemo
from data_pipelines.tfds.lsmdc import Lsmdc
from data_pipelines.tfds.msrvtt import Msrvtt
from data_pipelines.tfds.msvd import Msvd
from data_pipelines.tfds.vatex import Vatex
from data_pipelines.tfds.video_text_corpus import VideoTextCorpus, VideoTextCorpusConfig

__all__ = ["ActivitynetCaptions", "ClipBuilderConfig", "ClipDatasetBuilder", "Didemo", "Lsmdc", "ManualDir",
           "MissingManualFilesError", "Msrvtt", "Msvd", "TfdsRecordSource", "Vatex", "VideoTextCorpus",
           "VideoTextCorpusConfig"]
