"""LSMDC as a TFDS dataset of clip records: `tfds.data_source("lsmdc", data_dir=...)`."""

from __future__ import annotations

from data_pipelines import annotations
from data_pipelines.tfds.common import ClipBuilderConfig, ClipDatasetBuilder, ManualDir

_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
          "test": "LSMDC16_challenge_1000_publictect.csv"}

_INSTRUCTIONS = """\
LSMDC is distributed on request (sites.google.com/site/describingmovies). Put anywhere under the manual
directory (found by name):

  LSMDC16_annos_training.csv              training clips and sentences (tab-separated, 6 fields)
  LSMDC16_annos_val.csv                   validation clips
  LSMDC16_challenge_1000_publictect.csv   the 1,000-clip public test used for retrieval
  <movie>/<clip name>.avi                 the clip videos (e.g. 0001_American_Beauty/
                                          0001_American_Beauty_00.00.51.926-00.00.54.129.avi)

Then build (no TensorFlow needed; `tfds build` would import it):
  python -m data_pipelines.tfds.build lsmdc --manual-dir MANUAL_DIR --data-dir DATA_DIR
"""


class Lsmdc(ClipDatasetBuilder):
  """LSMDC (Rohrbach et al., IJCV 2017): ~118k movie clips, one sentence each (names replaced by SOMEONE).

  Splits: train (LSMDC16_annos_training.csv), val (LSMDC16_annos_val.csv), test (the 1k public test,
  LSMDC16_challenge_1000_publictect.csv), as in CLIP4Clip and CLIP-ViP.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://sites.google.com/site/describingmovies/"
  DESCRIPTION = "LSMDC movie-description retrieval: movie clips with their sentences."
  CITATION = (
      "@article{rohrbach2017movie, title={Movie Description}, author={Rohrbach, Anna and Torabi, Atousa "
      "and Rohrbach, Marcus and Tandon, Niket and Pal, Christopher and Larochelle, Hugo and Courville, "
      "Aaron and Schiele, Bernt}, journal={IJCV}, year={2017}}")
  BUILDER_CONFIGS = [ClipBuilderConfig(name="default")]

  def _clips_by_split(self, manual: ManualDir) -> dict[str, list[annotations.Clip]]:
    found = manual.require(list(_FILES.values()), "lsmdc", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: annotations.parse_lsmdc(found[name], split) for split, name in _FILES.items()}
