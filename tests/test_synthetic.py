"""The synthetic twin set: determinism, unique captions per split, twins = reversed frames + opposite motion."""

import collections
import re

import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines.manifest import read_manifest, shard_paths
from data_pipelines.shard_writer import read_records
from data_pipelines.video_io import decode_jpeg

OPPOSITE = {a[0]: b[0] for a, b in synthetic.AXES} | {b[0]: a[0] for a, b in synthetic.AXES}
MOTION = re.compile(r" moves (.+) (slowly|quickly) on ")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  manifest = synthetic.generate(str(out), num_clips=400, seed=3, shard_size=64)
  records = {split: [r for p in shard_paths(str(out), split) for r in read_records(p)]
             for split in manifest["splits"]}
  return out, manifest, records


def files(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_data(generated, tmp_path):
  out, _, _ = generated
  synthetic.generate(str(tmp_path / "again"), num_clips=400, seed=3, shard_size=64)
  assert files(tmp_path / "again") == files(out)
  synthetic.generate(str(tmp_path / "other"), num_clips=400, seed=4, shard_size=64)
  assert files(tmp_path / "other")["manifest.json"] != files(out)["manifest.json"]
  assert files(tmp_path / "other")["val-00000-of-00001.array_record"] != files(out)["val-00000-of-00001.array_record"]


def test_splits_are_80_10_10_of_pairs(generated):
  _, manifest, records = generated
  assert {s: len(r) for s, r in records.items()} == {"train": 320, "val": 40, "test": 40}
  assert manifest["counts"] == {"inputs": 400, "records": 400, "skipped": 0, "shards": 7}
  assert read_manifest(str(generated[0]))["splits"]["train"]["shards"][0] == "train-00000-of-00005.array_record"


def test_captions_unique_within_each_split_and_overall(generated):
  _, _, records = generated
  everything = []
  for split_records in records.values():
    captions = [c for r in split_records for c in r.captions]
    assert len(set(captions)) == len(captions)
    everything += captions
  assert len(set(everything)) == len(everything)


def test_twins_are_reversed_frames_with_opposite_motion_words(generated):
  _, _, records = generated
  for split, split_records in records.items():
    pairs = collections.defaultdict(dict)
    for r in split_records:
      pair, kind = r.clip_id.rsplit("-", 1)
      pairs[pair][kind] = r
    assert len(pairs) == len(split_records) // 2  # both twins in the same split
    for twins in pairs.values():
      fwd, rev = twins["fwd"], twins["rev"]
      assert rev.frames == fwd.frames[::-1] and fwd.frames != rev.frames
      (a,), (b,) = fwd.captions, rev.captions
      ma, mb = MOTION.search(a), MOTION.search(b)
      assert OPPOSITE[ma.group(1)] == mb.group(1)
      assert a[:ma.start(1)] + a[ma.end(1):] == b[:mb.start(1)] + b[mb.end(1):]  # nothing else differs


@pytest.mark.parametrize("axis, forward", [(a, f) for a in range(len(synthetic.AXES)) for f in (False, True)])
def test_rendered_motion_matches_the_caption(axis, forward):
  (name, (dx, dy)), _ = synthetic.AXES[axis] if forward else synthetic.AXES[axis][::-1]
  attrs = {"shape": "circle", "colour": "red", "size": "small", "speed": "quickly", "background": "noisy",
           "second": None, "forward": (name, (dx, dy))}
  video = synthetic.render_pair(attrs, frames=8, size=32, rng=np.random.default_rng(0)).astype(np.float64)
  red = (video[..., 0] > 180) & (video[..., 1] < 90) & (video[..., 2] < 90)
  ys, xs = np.mgrid[0:32, 0:32]
  first = np.array([xs[red[0]].mean(), ys[red[0]].mean()])
  last = np.array([xs[red[-1]].mean(), ys[red[-1]].mean()])
  travel = last - first
  # From the first to the last frame the shape covers the whole path, SPEEDS x frame size.
  assert np.linalg.norm(travel) == pytest.approx(synthetic.SPEEDS["quickly"] * 32, rel=0.15)
  assert np.sign(np.round(travel / 3)).tolist() == [dx, dy]


def test_frames_have_the_requested_shape(generated, tmp_path):
  _, _, records = generated
  frame = decode_jpeg(records["test"][0].frames[0])
  assert frame.shape == (32, 32, 3) and records["test"][0].num_frames == 8
  synthetic.generate(str(tmp_path), num_clips=6, seed=0, frames=12, size=48)
  small = next(read_records(shard_paths(str(tmp_path), "val")[0]))
  assert small.num_frames == 12 and decode_jpeg(small.frames[0]).shape == (48, 48, 3)


def test_bad_arguments_fail_with_one_sentence(capsys, tmp_path):
  assert synthetic.main(["--out", str(tmp_path), "--clips", "7"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "even" in err
  assert synthetic.main(["--out", str(tmp_path), "--clips", "4", "--size", "8"]) == 2
  with pytest.raises(SystemExit) as e:
    synthetic.main(["--help"])
  assert e.value.code == 0
