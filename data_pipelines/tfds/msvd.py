"""MSVD as a TFDS dataset of clip records: `tfds.data_source("msvd", data_dir=...)`."""

from __future__ import annotations

from data_pipelines import annotations
from data_pipelines.tfds.common import ClipBuilderConfig, ClipDatasetBuilder, ManualDir

_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}

_INSTRUCTIONS = """\
Put these files anywhere under the manual directory (found by name, nested folders are fine):

  raw-captions.pkl                    {video id: [[word, ...], ...]} (CLIP4Clip / CLIP2Video msvd_data)
  train_list.txt, val_list.txt, test_list.txt   video ids, one per line (1,200 / 100 / 670)
  YouTubeClips/<video id>.avi          the raw clips (www.cs.utexas.edu/users/ml/clamp/videoDescription/
                                       YouTubeClips.tar), e.g. -4wsuPCjDBc_5_15.avi

Then build (no TensorFlow needed; `tfds build` would import it):
  python -m data_pipelines.tfds.build msvd --manual-dir MANUAL_DIR --data-dir DATA_DIR
"""


class Msvd(ClipDatasetBuilder):
  """MSVD (Chen & Dolan, ACL 2011): 1,970 YouTube clips with ~40 English captions each.

  Splits: train 1,200 / val 100 / test 670 (the standard split lists); every caption kept (multi-caption
  retrieval: each caption is a query, video-to-text takes the best of a video's captions).
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://www.cs.utexas.edu/users/ml/clamp/videoDescription/"
  DESCRIPTION = "MSVD text-video retrieval: clips with all their English captions."
  CITATION = (
      "@inproceedings{chen2011msvd, title={Collecting Highly Parallel Data for Paraphrase Evaluation}, "
      "author={Chen, David L. and Dolan, William B.}, booktitle={ACL}, year={2011}}")
  BUILDER_CONFIGS = [ClipBuilderConfig(name="default")]

  def _clips_by_split(self, manual: ManualDir) -> dict[str, list[annotations.Clip]]:
    found = manual.require(["raw-captions.pkl", *_LISTS.values()], "msvd", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: annotations.parse_msvd(found["raw-captions.pkl"], found[name], split)
            for split, name in _LISTS.items()}
