"""CLIP-ViP: parity with the original (fixtures, through convert() and load_pretrained), the temporal
resampling against torch, conversion edge cases, init from CLIP, and shape/pattern checks at random sizes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from clipvip_jax import kinds
from clipvip_jax import params as params_lib
from clipvip_jax.convert import clipvip as convert_clipvip
from clipvip_jax.convert import hf_clip
from clipvip_jax.convert.common import ConversionError
from clipvip_jax.models import clip
from clipvip_jax.models.clipvip import CLIPViPConfig, linear_resample_indices, resample_temporal

ATOL = 1e-4
FRAME_COUNTS = (4, 6, 1)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  sd = {k: v.numpy() for k, v in torch.load(fixtures_dir / "clipvip_tiny.pt", map_location="cpu").items()}
  config = json.loads((fixtures_dir / "clipvip_tiny_config.json").read_text())
  io = dict(np.load(fixtures_dir / "clipvip_tiny_io.npz"))
  return sd, config, io


def _video(io, t):
  return io[f"video_T{t}"].transpose(0, 1, 3, 4, 2)  # fixtures are channels-first


def _random_params(cfg, seed=0, scale=0.2):
  """Random weights for every parameter (LayerNorm gains around 1), so layout mistakes cannot hide."""
  rng = np.random.default_rng(seed)
  shapes = kinds.param_shapes("clipvip", cfg)
  return {k: (rng.normal(0, scale, s) + (k.endswith("/scale"))).astype(np.float32) for k, s in shapes.items()}


@nnx.jit
def _features(model, video):
  return model.vision_features(video)


@nnx.jit
def _text(model, ids, mask):
  return model.text(ids, mask)


def test_fixture_parity_through_convert(fixture):
  sd, config, io = fixture
  assert convert_clipvip.detect(sd, None)
  converted = convert_clipvip.convert(sd, config, "clipvip_tiny.pt")
  cfg = converted.config
  assert (cfg.num_proxies, cfg.temporal_size, cfg.use_temporal_embed) == (4, 4, True)
  assert (cfg.clip.vision.heads, cfg.clip.text.heads, cfg.clip.projection_dim) == (4, 4, 32)
  model = kinds.build_model("clipvip", cfg, converted.params)
  text = _text(model, jnp.asarray(io["text_ids"]), jnp.asarray(io["text_mask"]))
  np.testing.assert_allclose(text["last_hidden"], io["text_last_hidden"], atol=ATOL)
  np.testing.assert_allclose(clip.l2_normalize(text["embeds"]), io["text_embeds"], atol=ATOL)
  for t in FRAME_COUNTS:
    out = _features(model, jnp.asarray(_video(io, t)))
    assert out["last_hidden"].shape == (2, 4 + 16 * t, 64)
    np.testing.assert_allclose(out["last_hidden"], io[f"video_T{t}_last_hidden"], atol=ATOL, err_msg=f"T={t}")
    np.testing.assert_allclose(clip.l2_normalize(out["embeds"]), io[f"video_T{t}_embeds"], atol=ATOL,
                               err_msg=f"T={t}")
  np.testing.assert_allclose(model.logit_scale[...], io["logit_scale"], atol=1e-6)


def test_fixture_parity_through_load_pretrained(fixtures_dir, fixture):
  from clipvip_jax.retrieval.pretrained import load_pretrained
  _, _, io = fixture
  # The config file holds the HF dict under "clip_config"; pass it as a path and as the bare dict.
  bare = json.loads((fixtures_dir / "clipvip_tiny_config.json").read_text())["clip_config"]
  model = load_pretrained(fixtures_dir / "clipvip_tiny.pt", config=fixtures_dir / "clipvip_tiny_config.json")
  assert model.kind == "clipvip" and model.config == load_pretrained(fixtures_dir / "clipvip_tiny.pt", bare).config
  text = model.encode_text(io["text_ids"], io["text_mask"])
  np.testing.assert_allclose(text, io["text_embeds"], atol=ATOL)
  for t in FRAME_COUNTS:
    video = model.encode_video(_video(io, t))
    np.testing.assert_allclose(video, io[f"video_T{t}_embeds"], atol=ATOL, err_msg=f"T={t}")
  image = model.encode_image(_video(io, 1)[:, 0])
  np.testing.assert_allclose(image, io["video_T1_embeds"], atol=ATOL)
  sim = model.similarity(text, video)
  np.testing.assert_allclose(sim, np.asarray(text) @ np.asarray(video).T, atol=1e-6)


def test_fp16_file_through_cli_and_converted_dir(fixtures_dir, fixture, tmp_path):
  """A float16 `clipmodel.` file (as released checkpoints may be) -> `python -m clipvip_jax.convert` -> a
  converted directory that load_pretrained reads back with the same config."""
  from clipvip_jax.retrieval.pretrained import load_pretrained
  from clipvip_jax.convert.__main__ import main as convert_main
  from clipvip_jax.convert.formats import detect_format
  sd, config, io = fixture
  assert detect_format(sd) == "clipvip"
  half = {k: torch.from_numpy(v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in sd.items()}
  torch.save(half, tmp_path / "half.pt")
  out = tmp_path / "converted"
  assert convert_main([str(tmp_path / "half.pt"), "--out", str(out),
                       "--config", str(fixtures_dir / "clipvip_tiny_config.json")]) == 0
  model = load_pretrained(out)
  assert model.kind == "clipvip" and model.config == convert_clipvip.convert(sd, config, "fp32").config
  video = model.encode_video(_video(io, 6))
  np.testing.assert_allclose(video, io["video_T6_embeds"], atol=1e-2)  # fp16 weights: close, not exact
  flat = params_lib.flat_params(model.model)
  np.testing.assert_array_equal(flat["vision/temporal_embedding"],
                                half["clipmodel.vision_model.embeddings.temporal_embedding"].float().numpy())


@pytest.mark.parametrize("src,dst", [(12, 1), (12, 32), (12, 7), (4, 6), (4, 1), (5, 3), (3, 8), (1, 5), (7, 7)])
def test_temporal_resampling_matches_torch(src, dst):
  embed = np.random.default_rng(src * 100 + dst).normal(size=(src, 5)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(embed.T[None]), size=dst, mode="linear",
                                        align_corners=False)[0].numpy().T
  np.testing.assert_allclose(resample_temporal(jnp.asarray(embed), dst), ref, atol=1e-6)


def test_temporal_resampling_one_frame_is_the_middle_pair():
  lo, hi, w = linear_resample_indices(12, 1)
  assert (lo[0], hi[0], w[0]) == (5, 6, 0.5)
  embed = jnp.arange(12 * 3, dtype=jnp.float32).reshape(12, 3)
  np.testing.assert_allclose(resample_temporal(embed, 1)[0], 0.5 * (embed[5] + embed[6]))


def test_config_from_hf_and_dict_round_trip(fixture):
  _, config, _ = fixture
  wrapped = CLIPViPConfig.from_hf(config)
  assert wrapped == CLIPViPConfig.from_hf(config["clip_config"])
  assert (wrapped.num_proxies, wrapped.temporal_size, wrapped.use_temporal_embed, wrapped.logit_scale_init) == (
      4, 4, True, 4.6)
  assert CLIPViPConfig.from_dict(json.loads(json.dumps(wrapped.to_dict()))) == wrapped
  with pytest.raises(ValueError, match="num_frames"):
    CLIPViPConfig.from_dict({**wrapped.to_dict(), "num_frames": 3})
  no_extra = {k: v for k, v in config["clip_config"].items() if k != "vision_additional_config"}
  with pytest.raises(ValueError, match="vision_additional_config"):
    CLIPViPConfig.from_hf(no_extra)


def test_convert_fp16_prefixless_and_bad_inputs(fixture):
  sd, config, _ = fixture
  ref = convert_clipvip.convert(sd, config, "fp32").params
  half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()}
  got = convert_clipvip.convert(half, config, "fp16").params
  assert set(got) == set(ref) and all(v.dtype == np.float32 for v in got.values())
  np.testing.assert_array_equal(got["vision/added_cls"], sd["clipmodel.vision_model.embeddings.added_cls"]
                                .astype(np.float16).astype(np.float32))
  bare = {k[len("clipmodel."):]: v for k, v in sd.items() if "position_ids" not in k}
  assert convert_clipvip.detect(bare, None)
  np.testing.assert_array_equal(convert_clipvip.convert(bare, None, "bare").params["vision/temporal_embedding"],
                                ref["vision/temporal_embedding"])
  plain_clip = {k: v for k, v in bare.items() if "added_cls" not in k and "temporal_embedding" not in k}
  assert not convert_clipvip.detect(plain_clip, None)
  with pytest.raises(ConversionError, match="added_cls"):
    convert_clipvip.convert(plain_clip, config, "plain.pt")
  # Without temporal_embedding (if_use_temporal_embed = 0) the model has no such parameter.
  no_temporal = {k: v for k, v in sd.items() if "temporal_embedding" not in k}
  with pytest.warns(UserWarning, match="use_temporal_embed"):
    converted = convert_clipvip.convert(no_temporal, config, "no_temporal")
  assert not converted.config.use_temporal_embed and "vision/temporal_embedding" not in converted.params
  params_lib.check_params(kinds.param_shapes("clipvip", converted.config), converted.params)


def test_init_from_clip(fixture):
  sd, config, _ = fixture
  bare = {k[len("clipmodel."):]: v for k, v in sd.items()}
  clip_sd = {k: v for k, v in bare.items() if "added_cls" not in k and "temporal_embedding" not in k}
  clip_converted = hf_clip.convert(clip_sd, config["clip_config"], "clip part")
  model = convert_clipvip.init_from_clip(clip_converted.params, clip_converted.config, num_proxies=5,
                                         temporal_size=7, rng=3)
  flat = params_lib.flat_params(model)
  for key, value in clip_converted.params.items():
    if key != "logit_scale":
      np.testing.assert_array_equal(flat[key], value, err_msg=key)
  assert flat["vision/added_cls"].shape == (4, 64)
  assert 0.7 < float(jnp.std(flat["vision/added_cls"])) < 1.3  # N(0, 1), not a copy of the class token
  np.testing.assert_array_equal(flat["vision/temporal_embedding"], np.zeros((1, 7, 64)))
  np.testing.assert_allclose(flat["logit_scale"], 4.6)


def _random_config(m, t0, patch, image, pattern="block_sparse"):
  clip_cfg = clip.clip_config("tiny").replace(
      vision=clip.VisionConfig(width=32, layers=2, heads=2, mlp_dim=48, patch_size=patch, image_size=image),
      text=clip.TextConfig(width=16, layers=1, heads=2, mlp_dim=32, vocab_size=50, max_len=8), projection_dim=8)
  return CLIPViPConfig(clip=clip_cfg, num_proxies=m, temporal_size=t0, attention_pattern=pattern)


# (M proxies, T0, patch, image, frames T, check gradients): sizes unrelated to the fixture's 4/16/4.
RANDOM_CASES = [(1, 3, 4, 12, 5, False), (2, 5, 6, 12, 1, False), (5, 2, 4, 8, 7, True), (3, 1, 8, 24, 2, False)]


@pytest.mark.parametrize("case", RANDOM_CASES, ids=lambda c: "M{}T0{}p{}img{}T{}grad{}".format(*c))
def test_random_sizes_block_sparse_equals_dense(case):
  m, t0, patch, image, t, check_grads = case
  params = _random_params(_random_config(m, t0, patch, image), seed=m)
  sparse = kinds.build_model("clipvip", _random_config(m, t0, patch, image), params)
  dense = kinds.build_model("clipvip", _random_config(m, t0, patch, image, "dense"), params)
  video = jax.random.normal(jax.random.key(9), (2, t, image, image, 3))
  mask = jnp.asarray([[1] * t, [1] * max(t - 1, 1) + [0] * (t - max(t - 1, 1))])
  cot = jax.random.normal(jax.random.key(4), (2, 8))

  @nnx.jit
  def run(model, video, mask):
    out = model.vision_features(video, mask)
    if not check_grads:
      return out, {}
    grads = nnx.grad(lambda mdl: jnp.sum(mdl.vision_features(video, mask)["embeds"] * cot))(model)
    return out, nnx.to_pure_dict(grads)

  out_s, grads_s = run(sparse, video, mask)
  out_d, grads_d = run(dense, video, mask)
  patches = (image // patch)**2
  assert out_s["last_hidden"].shape == (2, m + t * patches, 32) and out_s["embeds"].shape == (2, 8)
  np.testing.assert_allclose(out_s["last_hidden"], out_d["last_hidden"], atol=1e-5)
  np.testing.assert_allclose(out_s["embeds"], out_d["embeds"], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_s, grads_d)


def test_frame_mask_semantics():
  cfg = _random_config(3, 4, 4, 8)
  model = kinds.build_model("clipvip", cfg, _random_params(cfg))
  video = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 3))
  encode = nnx.jit(lambda mdl, v, mask: mdl.encode_video(v, mask))
  plain = encode(model, video, None)
  np.testing.assert_allclose(encode(model, video, jnp.ones((2, 4), jnp.int32)), plain, atol=1e-6)
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32)
  noisy = video.at[0, 3].add(5.0).at[1, 2:].multiply(-3.0)  # change only the padded frames
  np.testing.assert_allclose(encode(model, noisy, mask), encode(model, video, mask), atol=1e-6)
  assert np.abs(encode(model, noisy, None) - plain).max() > 1e-4  # unmasked, the same change is seen
  image = nnx.jit(lambda mdl, x: mdl.encode_image(x))(model, video[:, 0])
  np.testing.assert_allclose(image, encode(model, video[:, :1], None), atol=1e-6)
  with pytest.raises(ValueError, match="frame_mask"):
    model.vision_features(video, jnp.ones((2, 3)))
