"""preview: counts, one decoded sample, and a readable contact-sheet PNG."""

import pytest
from PIL import Image

from data_pipelines import preview, synthetic


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("preview")
  synthetic.generate(str(out), num_clips=20, seed=1)
  return out


def test_preview_prints_counts_sample_and_writes_a_sheet(shard_dir, tmp_path, capsys):
  sheet = tmp_path / "sheet.png"
  assert preview.main([str(shard_dir), "--split", "val", "--out", str(sheet), "--clips", "2"]) == 0
  printed = capsys.readouterr().out
  assert "20 records" in printed and "train: 16 records" in printed
  assert "sample 'pair000008-fwd' (val): frames uint8 [8, 32, 32, 3]" in printed
  assert "caption: a " in printed
  with Image.open(sheet) as image:
    assert image.format == "PNG"
    # Two rows of eight 96-px frames (32-px frames drawn 3x) plus their labels.
    assert image.width >= 8 * preview.CELL_HEIGHT and image.height >= 2 * preview.CELL_HEIGHT
    pixels = image.convert("RGB").getcolors(maxcolors=1 << 20)
  assert len(pixels) > 50  # frames were drawn, not a blank page


def test_preview_errors_are_one_sentence(shard_dir, tmp_path, capsys):
  assert preview.main([str(tmp_path / "missing")]) == 2
  assert preview.main([str(shard_dir), "--split", "nope", "--out", ""]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "does not exist" in err[0] and "no split 'nope'" in err[1]
