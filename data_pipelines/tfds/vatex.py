"""VATEX (English captions) as a TFDS dataset of clip records: `tfds.data_source("vatex", data_dir=...)`."""

from __future__ import annotations

from data_pipelines import annotations
from data_pipelines.tfds.common import ClipBuilderConfig, ClipDatasetBuilder, ManualDir

_OFFICIAL = ["vatex_training_v1.0.json", "vatex_validation_v1.0.json"]

_INSTRUCTIONS = """\
Put these files anywhere under the manual directory (found by name, nested folders are fine):

  captions, either   vatex_training_v1.0.json + vatex_validation_v1.0.json (eric-xw.github.io/vatex-website)
            or       vatex_data.json ({videoID: {"enCap": [...]}}, CLIP2Video's vatex_data)
  test_list.txt      the 1,500 test video ids (the HGR / CLIP2Video split of the official validation set)
  train_list.txt     optional: training ids (default: every video of vatex_training_v1.0.json, 25,991)
  <videoID>.mp4      the clips, e.g. Ptf_2VRj-V0_000122_000132.mp4 (YouTube id, start, end), or frame folders

Then build (no TensorFlow needed; `tfds build` would import it):
  python -m data_pipelines.tfds.build vatex --manual-dir MANUAL_DIR --data-dir DATA_DIR
"""


class Vatex(ClipDatasetBuilder):
  """VATEX (Wang et al., ICCV 2019), English captions: 10 per clip.

  Splits: train (25,991 videos: train_list.txt, or all of vatex_training_v1.0.json) and test (the 1,500
  videos of test_list.txt), as CLIP2Video evaluates; every caption kept (multi-caption retrieval).
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://eric-xw.github.io/vatex-website/"
  DESCRIPTION = "VATEX text-video retrieval (English): clips with their 10 English captions."
  CITATION = (
      "@inproceedings{wang2019vatex, title={VaTeX: A Large-Scale, High-Quality Multilingual Dataset for "
      "Video-and-Language Research}, author={Wang, Xin and Wu, Jiawei and Chen, Junkun and Li, Lei and "
      "Wang, Yuan-Fang and Wang, William Yang}, booktitle={ICCV}, year={2019}}")
  BUILDER_CONFIGS = [ClipBuilderConfig(name="default")]

  def _clips_by_split(self, manual: ManualDir) -> dict[str, list[annotations.Clip]]:
    # CLIP2Video's single caption file needs its train list; the official files default to all training videos.
    clip2video_layout = manual.find("vatex_data.json") is not None
    caption_names = ["vatex_data.json"] if clip2video_layout else _OFFICIAL
    list_names = ["train_list.txt", "test_list.txt"] if clip2video_layout else ["test_list.txt"]
    found = manual.require([*caption_names, *list_names], "vatex", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    captions = [found[name] for name in caption_names]
    train_list = found.get("train_list.txt") or manual.find("train_list.txt")
    train = (annotations.parse_vatex(captions, "train", train_list) if train_list
             else annotations.parse_vatex([found["vatex_training_v1.0.json"]], "train"))
    return {"train": train, "test": annotations.parse_vatex(captions, "test", found["test_list.txt"])}
