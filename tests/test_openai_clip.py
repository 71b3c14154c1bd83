"""OpenAI CLIP layout -> our CLIP: the weights of a random transformers CLIPModel written in OpenAI's naming
(torch_clip_helpers.openai_state_dict, the inverse mapping written independently of the converter) must give the
HF model's embeddings; sizes are inferred as OpenAI's build_model does; bad files are rejected by key name."""

from __future__ import annotations

import numpy as np
import pytest

import torch_clip_helpers as tch
from clipvip_jax import kinds
from clipvip_jax.convert import openai_clip
from clipvip_jax.convert.common import ConversionError
from clipvip_jax.params import ParamMismatchError

# Vision and text widths differ (2 and 1 heads of 64) so a tower mix-up cannot hide.
SPEC = dict(vision=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=384,
                        patch_size=8, image_size=24),
            text=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=1, intermediate_size=256,
                      vocab_size=300, max_position_embeddings=12),
            projection_dim=48)


@pytest.fixture(scope="module")
def openai_case():
  model = tch.random_clip(SPEC, seed=3)
  sd = {k: v.numpy() for k, v in tch.openai_state_dict(model).items()}
  images, ids, mask = tch.inputs(SPEC)
  return model, sd, (images, ids, mask)


def _embeddings(converted, images, ids, mask):
  m = kinds.build_model(converted.kind, converted.config, converted.params)
  return np.asarray(m.encode_image(images)), np.asarray(m.encode_text(ids, mask))


def test_config_inferred_from_the_weights(openai_case):
  _, sd, _ = openai_case
  cfg = openai_clip.infer_config(sd)
  v, t = cfg.vision, cfg.text
  assert (v.width, v.layers, v.heads, v.mlp_dim, v.patch_size, v.image_size) == (128, 2, 2, 384, 8, 24)
  assert (t.width, t.layers, t.heads, t.mlp_dim, t.vocab_size, t.max_len) == (64, 3, 1, 256, 300, 12)
  assert cfg.projection_dim == 48


def test_converted_model_equals_transformers(openai_case):
  model, sd, (images, ids, mask) = openai_case
  assert openai_clip.detect(sd)
  converted = openai_clip.convert(sd, None, "openai")
  assert converted.kind == "clip"
  ref_img, ref_txt = tch.torch_embeddings(model, images, ids, mask)
  img, txt = _embeddings(converted, images, ids, mask)
  np.testing.assert_allclose(img, ref_img, atol=1e-5)
  np.testing.assert_allclose(txt, ref_txt, atol=1e-5)
  assert float(converted.params["logit_scale"]) == pytest.approx(float(model.logit_scale.detach()))


def test_prefixed_layout_and_round_trip(openai_case):
  """Under `clip.` (CLIP4Clip / CLIP2Video) into `clip/`; from_params gives the original arrays back exactly."""
  _, sd, _ = openai_case
  cfg = openai_clip.infer_config(sd)
  plain = openai_clip.to_params(sd, cfg)
  prefixed = openai_clip.to_params({f"clip.{k}": v for k, v in sd.items()} | {"other.weight": np.zeros(3)}, cfg,
                                   src="clip.", dst="clip/")
  assert sorted(prefixed) == sorted(f"clip/{k}" for k in plain)
  for k, v in plain.items():
    np.testing.assert_array_equal(prefixed[f"clip/{k}"], v)
  back = openai_clip.from_params(plain, cfg)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], np.asarray(v, np.float32).reshape(back[k].shape), err_msg=k)


def test_torchscript_scalars_and_float16_are_accepted(openai_case):
  """OpenAI's archives carry input_resolution / context_length / vocab_size and often float16 weights."""
  _, sd, _ = openai_case
  extra = {"input_resolution": np.array(24), "context_length": np.array(12), "vocab_size": np.array(300)}
  half = {k: v.astype(np.float16) for k, v in sd.items()}
  converted = openai_clip.convert(half | extra, None, "jit")
  assert all(v.dtype == np.float32 for v in converted.params.values())


def test_missing_key_is_named(openai_case):
  _, sd, _ = openai_case
  broken = {k: v for k, v in sd.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}
  with pytest.raises(ParamMismatchError, match=r"missing keys \(1\): transformer\.resblocks\.1\.attn\.in_proj_bias"):
    openai_clip.convert(broken, None, "broken")


def test_unexpected_and_misshaped_keys_are_named(openai_case):
  _, sd, _ = openai_case
  extra = dict(sd, **{"visual.transformer.resblocks.0.attn.extra": np.zeros(2)})
  with pytest.raises(ParamMismatchError, match=r"unexpected keys \(1\): visual\.transformer\.resblocks\.0\.attn\.extra"):
    openai_clip.convert(extra, None, "extra")
  bad = dict(sd, **{"ln_final.bias": np.zeros(65, np.float32)})
  with pytest.raises(ParamMismatchError, match=r"wrong shape for ln_final\.bias: \(65,\), model expects \(64,\)"):
    openai_clip.convert(bad, None, "bad")
  with pytest.raises(ParamMismatchError, match="missing keys .*visual.conv1.weight"):
    openai_clip.convert({k: v for k, v in sd.items() if k != "visual.conv1.weight"}, None, "noconv")


def test_config_that_disagrees_with_the_weights_is_an_error(openai_case):
  _, sd, _ = openai_case
  openai_clip.convert(sd, {"vision_width": 128, "transformer_heads": 8}, "ok")  # heads: the original ignores them
  with pytest.raises(ConversionError, match=r"vocab_size = 49408 \(weights: 300\)"):
    openai_clip.convert(sd, {"vocab_size": 49408}, "clash")


def test_resnet_clip_is_refused_by_name():
  sd = {"visual.layer1.0.conv1.weight": np.zeros((1,)), "visual.attnpool.c_proj.weight": np.zeros((1,)),
        "text_projection": np.zeros((4, 4)), "token_embedding.weight": np.zeros((4, 4)),
        "ln_final.weight": np.zeros(4)}
  assert openai_clip.detect(sd)
  with pytest.raises(ConversionError, match="ResNet"):
    openai_clip.convert(sd, None, "rn50")


def test_detect_rejects_other_layouts(openai_case):
  model, sd, _ = openai_case
  assert not openai_clip.detect({k: v.numpy() for k, v in model.state_dict().items()})  # HF naming
  assert not openai_clip.detect({f"clip.{k}": v for k, v in sd.items()})  # CLIP2Video's, prefixed
