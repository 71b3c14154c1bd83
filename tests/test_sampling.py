"""Frame sampling: the spec's formulas over many clip lengths, the short-clip and T == 1 rules, and decoding only
the sampled frames."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import sampling, transforms

TOTALS = [1, 2, 3, 5, 7, 11, 12, 13, 24, 37, 100, 251, 1000]
NUM_FRAMES = [1, 2, 3, 4, 8, 12, 32]


def test_clipvip_test_indices_hand_cases():
  # 99 / 11 = 9 exactly.
  idx, mask = sampling.clipvip_frame_indices(100, 12, train=False)
  np.testing.assert_array_equal(idx, [0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99])
  np.testing.assert_array_equal(mask, np.ones(12))
  # 29 / 11 = 2.636...: floor of k * 2.636.
  idx, _ = sampling.clipvip_frame_indices(30, 12, train=False)
  np.testing.assert_array_equal(idx, [0, 2, 5, 7, 10, 13, 15, 18, 21, 23, 26, 29])


def test_clipvip_short_clip_repeats_frames_instead_of_padding():
  # 4 / 11 = 0.364: each of the 5 frames repeats, mask stays 1 (CLIP-ViP never pads).
  idx, mask = sampling.clipvip_frame_indices(5, 12, train=False)
  np.testing.assert_array_equal(idx, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])
  np.testing.assert_array_equal(mask, np.ones(12))
  # In training interval = int(5 / 11) = 0, so start = 0 and end = total - 1: the same frames.
  rng = np.random.default_rng(0)
  for _ in range(20):
    train_idx, _ = sampling.clipvip_frame_indices(5, 12, train=True, rng=rng)
    np.testing.assert_array_equal(train_idx, idx)


@pytest.mark.parametrize("num_frames", [n for n in NUM_FRAMES if n >= 3])
@pytest.mark.parametrize("total", TOTALS)
def test_clipvip_train_formula(total, num_frames):
  """indices = int(linspace(start, end, T)), start ~ U{0..interval}, end ~ U{total-1-interval..total-1}, every
  value of both ranges reachable."""
  rng = np.random.default_rng(total * 100 + num_frames)
  interval = int(total / (num_frames - 1))
  starts, ends = set(), set()
  for _ in range(400):
    idx, mask = sampling.clipvip_frame_indices(total, num_frames, train=True, rng=rng)
    assert idx.shape == (num_frames,) and mask.all()
    start, end = int(idx[0]), int(idx[-1])  # linspace hits both endpoints exactly
    np.testing.assert_array_equal(idx, np.linspace(start, end, num_frames).astype(int))
    assert 0 <= idx.min() and idx.max() <= total - 1
    starts.add(start)
    ends.add(end)
  if interval < 40:  # small ranges: every value shows up in 400 draws
    assert starts == set(range(0, interval + 1))
    assert ends == set(range(total - 1 - interval, total))
  else:
    assert min(starts) >= 0 and max(starts) <= interval and max(starts) - min(starts) > 0.8 * interval
    assert min(ends) >= total - 1 - interval and max(ends) <= total - 1 and max(ends) - min(ends) > 0.8 * interval


@pytest.mark.parametrize("total", TOTALS)
def test_clipvip_two_frames_stay_in_range(total):
  # T == 2: interval = total, so the original's start/end can leave [0, total-1]; ours are clipped.
  rng = np.random.default_rng(total)
  for _ in range(50):
    idx, _ = sampling.clipvip_frame_indices(total, 2, train=True, rng=rng)
    assert idx.min() >= 0 and idx.max() <= total - 1


@pytest.mark.parametrize("sampler", [sampling.clipvip_frame_indices, sampling.clip2video_frame_indices])
@pytest.mark.parametrize("total", TOTALS)
def test_single_frame_is_the_middle_frame(sampler, total):
  for train in (False, True):
    idx, mask = sampler(total, 1, train, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, [total // 2])
    np.testing.assert_array_equal(mask, [1])


@pytest.mark.parametrize("num_frames", NUM_FRAMES)
@pytest.mark.parametrize("total", TOTALS)
def test_clipvip_test_is_linspace(total, num_frames):
  if num_frames == 1:
    return
  idx, mask = sampling.clipvip_frame_indices(total, num_frames, train=False)
  np.testing.assert_array_equal(idx, np.linspace(0, total - 1, num_frames).astype(int))
  assert mask.all()


@pytest.mark.parametrize("num_frames", NUM_FRAMES)
@pytest.mark.parametrize("total", TOTALS)
def test_clip2video_pads_short_clips(total, num_frames):
  if total > num_frames:
    return
  for train in (False, True):
    idx, mask = sampling.clip2video_frame_indices(total, num_frames, train, np.random.default_rng(0))
    np.testing.assert_array_equal(idx[:total], np.arange(total))
    np.testing.assert_array_equal(mask, [1] * total + [0] * (num_frames - total))


def test_clip2video_hand_cases():
  idx, mask = sampling.clip2video_frame_indices(100, 12, train=False)
  np.testing.assert_array_equal(idx, [0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99])
  assert mask.all()
  # Step 9 -> jitter half-width 4: interior frames move by -4..3, the ends stay.
  rng = np.random.default_rng(1)
  offsets = set()
  for _ in range(300):
    jittered, _ = sampling.clip2video_frame_indices(100, 12, train=True, rng=rng)
    assert jittered[0] == 0 and jittered[-1] == 99
    offsets.update((jittered[1:-1] - idx[1:-1]).tolist())
  assert offsets == set(range(-4, 4))


@pytest.mark.parametrize("num_frames", [n for n in NUM_FRAMES if n >= 2])
@pytest.mark.parametrize("total", TOTALS)
def test_clip2video_long_clip_formula(total, num_frames):
  if total <= num_frames:
    return
  base = np.linspace(0, total - 1, num_frames).astype(int)
  idx, mask = sampling.clip2video_frame_indices(total, num_frames, train=False)
  np.testing.assert_array_equal(idx, base)
  step = int(base[1] - base[0]) // 2
  rng = np.random.default_rng(total)
  for _ in range(100):
    idx, mask = sampling.clip2video_frame_indices(total, num_frames, train=True, rng=rng)
    assert mask.all() and idx[0] == 0 and idx[-1] == total - 1
    offsets = idx[1:-1] - base[1:-1]
    if offsets.size:
      assert offsets.min() >= -step and (offsets.max() < step or step == 0 and offsets.max() == 0)
    assert np.all(np.diff(idx) >= 0) and idx.max() <= total - 1


def test_train_sampling_needs_a_generator_and_bad_arguments_raise():
  with pytest.raises(ValueError, match="Generator"):
    sampling.clipvip_frame_indices(50, 12, train=True)
  with pytest.raises(ValueError, match="at least one"):
    sampling.clipvip_frame_indices(0, 12, train=False)
  with pytest.raises(ValueError, match="sampling must be one of"):
    sampling.frame_indices("uniform", 10, 4, False)


def test_same_generator_state_gives_same_frames():
  a = sampling.clipvip_frame_indices(300, 12, True, np.random.default_rng(7))[0]
  b = sampling.clipvip_frame_indices(300, 12, True, np.random.default_rng(7))[0]
  np.testing.assert_array_equal(a, b)


def test_subsample_to_rate():
  np.testing.assert_array_equal(sampling.subsample_to_rate(30, 30.0, 5.0), np.linspace(0, 29, 5).astype(int))
  np.testing.assert_array_equal(sampling.subsample_to_rate(30, 5.0, 5.0), np.arange(30))
  np.testing.assert_array_equal(sampling.subsample_to_rate(30, 0.0, 5.0), np.arange(30))
  np.testing.assert_array_equal(sampling.subsample_to_rate(30, 30.0, None), np.arange(30))


def _jpeg(color, size=(40, 30)):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def test_only_sampled_frames_are_decoded():
  frames = [_jpeg((10 * i, 0, 0)) for i in range(10)]
  frames[1] = b"not a jpeg"  # never sampled below
  idx = np.array([0, 5, 9, 9])
  video = transforms.decode_frames(frames, idx, np.ones(4, np.int32), 16, "squash")
  assert video.shape == (4, 16, 16, 3) and video.dtype == np.uint8
  np.testing.assert_allclose(video[:, 8, 8, 0], [0, 50, 90, 90], atol=3)
  with pytest.raises(ValueError, match="frame 1"):
    transforms.decode_frames(frames, np.array([0, 1]), np.ones(2, np.int32), 16, "squash")


def test_resize_modes():
  # Left half red, right half blue, 64 x 32: squash keeps both halves, crop keeps the centre 32 x 32.
  img = Image.new("RGB", (64, 32), (255, 0, 0))
  img.paste((0, 0, 255), (32, 0, 64, 32))
  squashed = transforms.resize_frame(img, 16, "squash")
  cropped = transforms.resize_frame(img, 16, "crop")
  assert squashed.shape == cropped.shape == (16, 16, 3)
  assert squashed[8, 1, 0] > 200 and squashed[8, 14, 2] > 200
  # The crop of a 32x16 resize is columns 8..23: left half still red, right half blue.
  assert cropped[8, 1, 0] > 200 and cropped[8, 14, 2] > 200
  # The crop resamples only the source box under the crop: the same as resizing the whole frame, then cropping.
  noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 80, 3), dtype=np.uint8))
  full = np.asarray(noisy.resize((28, 16), Image.BICUBIC))[:, 6:22]
  assert np.abs(transforms.resize_frame(noisy, 16, "crop").astype(int) - full).max() <= 1
  tall = Image.new("RGB", (30, 90), (0, 255, 0))
  assert transforms.resize_frame(tall, 20, "crop").shape == (20, 20, 3)
  with pytest.raises(ValueError, match="resize_mode"):
    transforms.resize_frame(img, 16, "pad")


def _encoded(pixels, **kw):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", **kw)
  return buf.getvalue()


@pytest.mark.skipif(transforms.simplejpeg is None, reason="simplejpeg is not installed (requirements.txt has it)")
@pytest.mark.parametrize("shape", [(256, 455), (224, 224), (37, 61), (480, 853)])
def test_fast_decoder_gives_pils_pixels(shape):
  """simplejpeg (the default decoder) and PIL: the same pixels, at full size and at every draft scale, for
  4:2:0, 4:4:4, progressive and greyscale JPEGs."""
  rng = np.random.default_rng(shape[0])
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  pixels = np.stack([xx * 255 // shape[1], yy * 255 // shape[0], (xx + yy) % 256], -1).astype(np.uint8)
  pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
  encodings = [_encoded(pixels, quality=90), _encoded(pixels, quality=75, subsampling=0),
               _encoded(pixels, quality=95, progressive=True), _encoded(pixels[..., 0])]

  def pil(data, min_size):
    img = Image.open(io.BytesIO(data))
    if min_size:
      img.draft("RGB", (min_size, min_size))
    return np.asarray(img.convert("RGB"))

  for data in encodings:
    for min_size in (None, 224, 100, 48, 16):
      expected = pil(data, min_size)
      got = transforms.decode_jpeg(data, min_size)
      assert got.shape == expected.shape and got.dtype == np.uint8
      np.testing.assert_array_equal(got, expected)
  saved = transforms.simplejpeg
  try:  # and the PIL path itself
    transforms.simplejpeg = None
    np.testing.assert_array_equal(transforms.decode_jpeg(encodings[0], 48), pil(encodings[0], 48))
  finally:
    transforms.simplejpeg = saved


def test_damaged_and_non_jpeg_frames():
  data = _encoded(np.full((32, 48, 3), 90, np.uint8))
  with pytest.raises(OSError):
    transforms.decode_jpeg(data[:len(data) // 2])  # truncated: an error, never a grey frame
  png = io.BytesIO()
  Image.new("RGB", (8, 6), (1, 2, 3)).save(png, "PNG")
  np.testing.assert_array_equal(transforms.decode_jpeg(png.getvalue())[0, 0], [1, 2, 3])


def test_model_ready_frames_are_not_resized():
  frame = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  for mode in transforms.RESIZE_MODES:
    assert transforms.resize_frame(frame, 16, mode) is frame
    # The same frame through PIL's resize at its own size: the identity too.
    np.testing.assert_array_equal(transforms.resize_frame(Image.fromarray(frame), 16, mode), frame)


def test_normalisation_values_and_padding():
  video = np.full((2, 4, 4, 3), 128, np.uint8)
  out = transforms.normalize_frames(video, np.array([1, 0]), np.float32)
  expected = (128 / 255 - np.array(transforms.CLIP_MEAN)) / np.array(transforms.CLIP_STD)
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
  assert not out[1].any()
  np.testing.assert_allclose(transforms.normalize_video(video, np.array([1, 0])), out, rtol=1e-6)
