"""MSR-VTT as a TFDS dataset of clip records: `tfds.data_source("msrvtt/9k", data_dir=...)`."""

from __future__ import annotations

from data_pipelines import annotations
from data_pipelines.tfds.common import ClipBuilderConfig, ClipDatasetBuilder, ManualDir

_INSTRUCTIONS = """\
Put these files anywhere under the manual directory (they are found by name, nested folders are fine):

  MSRVTT_data.json            captions and official split of the 10,000 videos (CLIP4Clip's msrvtt_data.zip;
                              the official train_val_videodatainfo.json + test_videodatainfo.json pair is
                              accepted instead)
  MSRVTT_train.9k.csv         config 9k only: the 9,000 training video ids (column `video_id`)
  MSRVTT_JSFUSION_test.csv    configs 9k and 7k: the 1k-A test split (key,vid_key,video_id,sentence)
  video0.mp4 ... video9999.mp4  the raw videos (MSRVTT_Videos/, TrainValVideo/ + TestVideo/, ...; a folder of
                              frame images named video<N> works too)

Then build (no TensorFlow needed; `tfds build` would import it):
  python -m data_pipelines.tfds.build msrvtt/9k --manual-dir MANUAL_DIR --data-dir DATA_DIR
(or msrvtt/7k, msrvtt/full)
"""


class Msrvtt(ClipDatasetBuilder):
  """MSR-VTT (Xu et al., CVPR 2016): 10,000 YouTube clips with 20 English captions each.

  Configs (each its own dataset folder, so a video is stored once per scheme you build; a custom
  `ClipBuilderConfig(name=..., scheme="9k", fps=...)` changes the frame options):
    9k   (default) train = MSRVTT_train.9k.csv (9,000 videos, all 20 captions), test = the 1k-A split
         (MSRVTT_JSFUSION_test.csv: 1,000 videos, one caption each) — the CLIP-ViP / CLIP4Clip protocol.
    7k   train = official train + validate (7,010 videos), test = 1k-A.
    full train / val / test = the official split of MSRVTT_data.json (6,513 / 497 / 2,990 videos, all captions).
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = (
      "https://www.microsoft.com/en-us/research/publication/msr-vtt-a-large-video-description-dataset-for-b"
      "ridging-video-and-language/")
  DESCRIPTION = "MSR-VTT text-video retrieval: clips with their captions."
  CITATION = (
      "@inproceedings{xu2016msrvtt, title={MSR-VTT: A Large Video Description Dataset for Bridging Video "
      "and Language}, author={Xu, Jun and Mei, Tao and Yao, Ting and Rui, Yong}, booktitle={CVPR}, "
      "year={2016}}")
  BUILDER_CONFIGS = [
      ClipBuilderConfig(name="9k", scheme="9k", description="train 9k / test 1k-A"),
      ClipBuilderConfig(name="7k", scheme="7k", description="train = official train + validate (7,010) / test 1k-A"),
      ClipBuilderConfig(name="full", scheme="full", description="official train 6,513 / val 497 / test 2,990"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "9k"

  def _clips_by_split(self, manual: ManualDir) -> dict[str, list[annotations.Clip]]:
    scheme = self.builder_config.scheme
    if scheme not in ("9k", "7k", "full"):
      raise ValueError(f"msrvtt: config {self.builder_config.name!r} has scheme {scheme!r}; use 9k, 7k or full")
    # Captions: MSRVTT_data.json, or the official pair when that is what the manual directory holds.
    official_pair = ["train_val_videodatainfo.json", "test_videodatainfo.json"]
    uses_pair = manual.find("MSRVTT_data.json") is None and any(manual.find(n) for n in official_pair)
    data_names = official_pair if uses_pair else ["MSRVTT_data.json"]
    split_names = {"9k": ["MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"], "7k": ["MSRVTT_JSFUSION_test.csv"],
                   "full": []}[scheme]
    found = manual.require([*data_names, *split_names], "msrvtt", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    data_json = [found[name] for name in data_names]
    if scheme == "9k":
      return {"train": annotations.parse_msrvtt_split_csv(found["MSRVTT_train.9k.csv"], data_json, "train"),
              "test": annotations.parse_msrvtt_jsfusion_test(found["MSRVTT_JSFUSION_test.csv"])}
    if scheme == "7k":
      return {"train": annotations.parse_msrvtt_official(data_json, ("train", "val"), rename={"val": "train"}),
              "test": annotations.parse_msrvtt_jsfusion_test(found["MSRVTT_JSFUSION_test.csv"])}
    clips = annotations.parse_msrvtt_official(data_json)
    return {split: [c for c in clips if c["split"] == split] for split in ("train", "val", "test")}
