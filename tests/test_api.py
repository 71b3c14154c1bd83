"""The public API: load_pretrained from every kind of path, Pretrained's jitted methods, its input checks,
and the video kinds end to end against the original implementations' fixtures."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import clipvip_jax
from clipvip_jax import converted_checkpoint
from clipvip_jax.convert import hf_clip
from clipvip_jax.convert.common import Converted
from clipvip_jax.kinds import param_shapes
from clipvip_jax.models.clip import clip_config

TINY = clip_config("tiny")  # image 32, patch 8, text 16 positions, vocab 49408, projection 32


@pytest.fixture(scope="module")
def flat():
  rng = np.random.default_rng(0)
  return {k: (0.05 * rng.normal(size=s)).astype(np.float32) for k, s in param_shapes("clip", TINY).items()}


@pytest.fixture(scope="module")
def converted_dir(flat, tmp_path_factory):
  out = tmp_path_factory.mktemp("api") / "tiny"
  converted_checkpoint.save_converted(Converted("clip", TINY, flat, source="random"), out)
  return out


@pytest.fixture(scope="module")
def model(converted_dir):
  return clipvip_jax.load_pretrained(converted_dir)


def _inputs(seed=0, n_images=3):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n_images, 32, 32, 3)).astype(np.float32)
  ids, mask = clipvip_jax.tokenize(["a dog", "two cats on a mat"], max_len=16)
  return images, ids, mask


def test_encoders_and_similarity(model):
  assert model.kind == "clip" and model.config == TINY
  images, ids, mask = _inputs()
  img, txt = model.encode_image(images), model.encode_text(ids, mask)
  assert isinstance(img, jax.Array) and img.shape == (3, 32) and txt.shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(txt), axis=-1), 1.0, rtol=1e-5)
  sim = model.similarity(txt, img)
  assert sim.shape == (2, 3)
  np.testing.assert_allclose(np.asarray(sim), np.asarray(txt) @ np.asarray(img).T, atol=1e-6)
  # Same values as the nnx module called directly (the split/jit wrapper changes nothing).
  np.testing.assert_allclose(np.asarray(img), np.asarray(model.model.encode_image(images)), atol=1e-6)


def test_compiles_once_per_shape(model):
  images, ids, mask = _inputs()
  for x in (images, images.astype(np.float64), jax.numpy.asarray(images)):
    model.encode_image(x)
  model.encode_text(ids, mask)
  model.encode_text(ids.astype(np.int64), mask.astype(np.int64))
  assert model.jitted("encode_image")._cache_size() == 1
  assert model.jitted("encode_text")._cache_size() == 1


def test_mask_defaults_to_ones(model):
  _, ids, mask = _inputs()
  np.testing.assert_array_equal(np.asarray(model.encode_text(ids)), np.asarray(model.encode_text(ids, np.ones_like(ids))))


def test_tokenize_uses_model_length(model):
  ids, mask = model.tokenize(["a dog playing fetch in the park"])
  assert ids.shape == mask.shape == (1, 16) and ids[0, 0] == 49406 and 49407 in ids[0]


@pytest.mark.parametrize("call, message", [
    (lambda m: m.encode_image(np.zeros((32, 32, 3), np.float32)), r"images must be \[batch, height, width"),
    (lambda m: m.encode_image(np.zeros((1, 32, 32, 3), np.uint8)), "must be float"),
    (lambda m: m.encode_image(np.zeros((1, 64, 64, 3), np.float32)), "64x64x3; this model takes 32x32x3"),
    (lambda m: m.encode_text(np.ones((1, 17), np.int32)), "length 17; this model has 16 text positions"),
    (lambda m: m.encode_text(np.full((1, 4), 49408)), "outside this model's vocabulary of 49408"),
    (lambda m: m.encode_text(np.ones((1, 4), np.float32)), "ids must be an integer array"),
    (lambda m: m.encode_text(np.ones((2, 4), np.int32), np.ones((2, 5), np.int32)), r"mask has shape \(2, 5\)"),
    (lambda m: m.encode_video(np.zeros((1, 2, 32, 32, 3), np.float32)), "encodes images, not videos"),
    (lambda m: m.similarity(np.zeros((2, 32)), np.zeros((3, 16))), r"got \(2, 32\) and \(3, 16\)"),
])
def test_input_checks(model, call, message):
  with pytest.raises(ValueError, match=message):
    call(model)


def test_bfloat16_compute(converted_dir, model):
  images, ids, mask = _inputs()
  bf16 = clipvip_jax.load_pretrained(converted_dir, dtype="bfloat16")
  assert bf16.config.dtype == "bfloat16" and bf16.model.vision.projection.kernel[...].dtype == np.float32
  np.testing.assert_allclose(np.asarray(bf16.encode_image(images)), np.asarray(model.encode_image(images)), atol=3e-2)
  np.testing.assert_allclose(np.asarray(bf16.encode_text(ids, mask)), np.asarray(model.encode_text(ids, mask)),
                             atol=3e-2)


@pytest.mark.parametrize("options, message", [
    (dict(attention="cudnn"), "needs dtype='bfloat16'"),
    (dict(attention="cudnn", dtype="bfloat16"), "text tower has 48 / 4 heads = 12"),
    (dict(attention="flash"), "attention 'flash' is not one of"),
    (dict(dtype="int8"), "dtype 'int8' is not one of"),
])
def test_compute_options_checked_up_front(converted_dir, options, message):
  with pytest.raises(ValueError, match=message):
    clipvip_jax.load_pretrained(converted_dir, **options)


def test_checkpoint_file_with_config(flat, model, tmp_path):
  """A bare PyTorch state dict: sizes from the weights, head counts from the HF config (dict or JSON path)."""
  torch.save({k: torch.from_numpy(v) for k, v in hf_clip.from_params(flat, TINY).items()}, tmp_path / "clip.pt")
  (tmp_path / "config.json").write_text(json.dumps({"clip_config": hf_clip.config_to_hf(TINY)}))
  images, ids, mask = _inputs()
  want = np.asarray(model.encode_image(images))
  for config in (hf_clip.config_to_hf(TINY), tmp_path / "config.json"):
    m = clipvip_jax.load_pretrained(tmp_path / "clip.pt", config=config)
    assert m.config == TINY
    np.testing.assert_allclose(np.asarray(m.encode_image(images)), want, atol=1e-6)
  guessed = clipvip_jax.load_pretrained(tmp_path / "clip.pt")  # no config: heads = width // 64
  assert (guessed.config.vision.heads, guessed.config.text.heads) == (1, 1)


def test_import_is_lazy():
  code = "import sys, clipvip_jax; assert not {'jax', 'torch', 'transformers'} & set(sys.modules); " \
         "print(clipvip_jax.load_pretrained.__module__)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "clipvip_jax.retrieval.pretrained"


@pytest.mark.slow  # duplicates tests/test_clipvip* parity; here it proves the API's video path
def test_clipvip_checkpoint(fixtures_dir):
  """The released CLIP-ViP layout, its config under "clip_config", videos of 4, 6 and 1 frames."""
  m = clipvip_jax.load_pretrained(fixtures_dir / "clipvip_tiny.pt", config=fixtures_dir / "clipvip_tiny_config.json")
  io = np.load(fixtures_dir / "clipvip_tiny_io.npz")
  assert m.kind == "clipvip"
  np.testing.assert_allclose(np.asarray(m.encode_text(io["text_ids"], io["text_mask"])), io["text_embeds"], atol=1e-4)
  for t in (4, 6, 1):
    video = io[f"video_T{t}"].transpose(0, 1, 3, 4, 2)  # the fixture is channels-first
    np.testing.assert_allclose(np.asarray(m.encode_video(video)), io[f"video_T{t}_embeds"], atol=1e-4)
  np.testing.assert_allclose(np.asarray(m.encode_image(io["video_T1"][:, 0].transpose(0, 2, 3, 1))),
                             io["video_T1_embeds"], atol=1e-4)


@pytest.mark.slow  # duplicates the CLIP2Video parity tests; here it proves the API's video path
def test_clip2video_checkpoint(fixtures_dir):
  """The CLIP2Video layout (float16 on disk): inference logits through encode_text/encode_video/similarity."""
  m = clipvip_jax.load_pretrained(fixtures_dir / "clip2video_tiny.pt",
                                  config=fixtures_dir / "clip2video_tiny_config.json")
  io = np.load(fixtures_dir / "clip2video_tiny_io.npz")
  assert m.kind == "clip2video"
  text = m.encode_text(io["text_ids"], io["text_mask"])
  video = m.encode_video(io["video"].transpose(0, 1, 3, 4, 2), io["video_mask"])
  np.testing.assert_allclose(np.asarray(m.similarity(text, video)), io["logits_inference"], atol=1e-4, rtol=1e-5)
  padded = m.encode_video(io["padded_video"].transpose(0, 1, 3, 4, 2), io["padded_video_mask"])
  np.testing.assert_allclose(np.asarray(m.similarity(text, padded)), io["padded_logits_inference"], atol=1e-4,
                             rtol=1e-5)
