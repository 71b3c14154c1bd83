"""DiDeMo as a TFDS dataset of clip records (paragraph-to-video): `tfds.data_source("didemo", data_dir=...)`."""

from __future__ import annotations

from data_pipelines import annotations
from data_pipelines.tfds.common import ClipBuilderConfig, ClipDatasetBuilder, ManualDir

_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}

_INSTRUCTIONS = """\
Put these files anywhere under the manual directory (found by name, nested folders are fine):

  train_data.json, val_data.json, test_data.json   the LocalizingMoments annotation files
                                                   (github.com/LisaAnne/LocalizingMoments, data/)
  the raw videos, named as the annotations' "video" field (e.g. 91414520@N00_4446149953_e3a8b97d2c.mov); a
  transcoded copy with another extension (….mp4) or a frame-image folder with the name minus its extension is
  found too. The videos come from YFCC100M (download script in the LocalizingMoments repository).

Then build (no TensorFlow needed; `tfds build` would import it):
  python -m data_pipelines.tfds.build didemo --manual-dir MANUAL_DIR --data-dir DATA_DIR
(didemo/sentences for one caption per sentence)
"""


class Didemo(ClipDatasetBuilder):
  """DiDeMo (Hendricks et al., ICCV 2017): ~10k Flickr videos with ~4 localized sentences each, used for
  paragraph-to-video retrieval: one clip per whole video, its sentences in temporal order.

  Configs:
    paragraph (default) captions = [all sentences joined with spaces], the query CLIP-ViP retrieves with.
    sentences captions = one per sentence (temporal order; join with annotations.join_paragraph).
  Splits: train / val / test from train_data.json / val_data.json / test_data.json.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://github.com/LisaAnne/LocalizingMoments"
  DESCRIPTION = "DiDeMo paragraph-to-video retrieval: whole videos with their moment descriptions."
  CITATION = (
      "@inproceedings{hendricks2017didemo, title={Localizing Moments in Video with Natural Language}, "
      "author={Hendricks, Lisa Anne and Wang, Oliver and Shechtman, Eli and Sivic, Josef and Darrell, "
      "Trevor and Russell, Bryan}, booktitle={ICCV}, year={2017}}")
  BUILDER_CONFIGS = [
      ClipBuilderConfig(name="paragraph", paragraph=True, description="one caption: the sentences joined"),
      ClipBuilderConfig(name="sentences", paragraph=False, description="one caption per sentence"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "paragraph"

  def _clips_by_split(self, manual: ManualDir) -> dict[str, list[annotations.Clip]]:
    found = manual.require(list(_FILES.values()), "didemo", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: annotations.parse_didemo(found[name], split) for split, name in _FILES.items()}
