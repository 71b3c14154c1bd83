"""ActivityNet Captions as a TFDS dataset of clip records (paragraph-to-video):
`tfds.data_source("activitynet_captions", data_dir=...)`."""

from __future__ import annotations

from data_pipelines import annotations
from data_pipelines.tfds.common import ClipBuilderConfig, ClipDatasetBuilder, ManualDir

# The paragraph-retrieval convention (CLIP4Clip, CLIP-ViP): train on train.json, evaluate on val_1.json.
_FILES = {"train": "train.json", "test": "val_1.json"}

_INSTRUCTIONS = """\
Put these files anywhere under the manual directory (found by name, nested folders are fine):

  train.json, val_1.json   ActivityNet Captions annotations (cs.stanford.edu/people/ranjaykrishna/densevid/
                           captions.zip); val_2.json is not used
  v_<youtube id>.mp4       the raw ActivityNet videos (any container ffmpeg reads; names without the "v_"
                           prefix, or frame-image folders of the same names, are found too)

Then build (no TensorFlow needed; `tfds build` would import it):
  python -m data_pipelines.tfds.build activitynet_captions --manual-dir MANUAL_DIR --data-dir DATA_DIR
"""


class ActivitynetCaptions(ClipDatasetBuilder):
  """ActivityNet Captions (Krishna et al., ICCV 2017): ~20k YouTube videos, each with several timed sentences,
  used for paragraph-to-video retrieval: one clip per whole video, sentences ordered by start time.

  Splits: train (train.json, 10,009 videos) and test (val_1.json, 4,917 videos: "val1" in the papers).
  Configs: paragraph (default; captions = [sentences joined with spaces] — users of CLIP-ViP report R@1 near
  20 without the join) and sentences (one caption per sentence).
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://cs.stanford.edu/people/ranjaykrishna/densevid/"
  DESCRIPTION = "ActivityNet Captions paragraph-to-video retrieval: whole videos with their sentences."
  CITATION = (
      "@inproceedings{krishna2017dense, title={Dense-Captioning Events in Videos}, author={Krishna, Ranjay "
      "and Hata, Kenji and Ren, Frederic and Fei-Fei, Li and Niebles, Juan Carlos}, booktitle={ICCV}, "
      "year={2017}}")
  BUILDER_CONFIGS = [
      ClipBuilderConfig(name="paragraph", paragraph=True, description="one caption: the sentences joined"),
      ClipBuilderConfig(name="sentences", paragraph=False, description="one caption per sentence"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "paragraph"

  def _clips_by_split(self, manual: ManualDir) -> dict[str, list[annotations.Clip]]:
    found = manual.require(list(_FILES.values()), "activitynet_captions", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: annotations.parse_activitynet(found[name], split) for split, name in _FILES.items()}

  def _video_names(self, clip: annotations.Clip) -> list[str]:
    # Annotation keys carry the "v_" prefix; some mirrors store <youtube id>.mp4.
    video = clip["video"]
    return [video, video[2:]] if video.startswith("v_") else [video, f"v_{video}"]
