"""CLIP2Video against the original's outputs (../shared/fixtures/clip2video_tiny*), through the converter,
`load_pretrained` and the CLI; the converter's options, errors and round trips at other configurations; and the
initialisation from a CLIP."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipvip_jax import kinds, load_pretrained
from clipvip_jax.convert import clip2video as convert_c2v
from clipvip_jax.convert import openai_clip
from clipvip_jax.convert.common import ConversionError, load_state_dict
from clipvip_jax.models.clip2video import CLIP2Video, CLIP2VideoConfig
from clipvip_jax.params import ParamMismatchError, shapes

from test_temporal import _tiny_clip, random_params

TOL = 1e-4  # the bound (float32, CPU); most values agree to ~1e-6


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  io = dict(np.load(fixtures_dir / "clip2video_tiny_io.npz"))
  for key in ("video", "padded_video"):
    io[key] = io[key].transpose(0, 1, 3, 4, 2)  # the original's [B, T, C, H, W] -> ours [B, T, H, W, C]
  return {"pt": fixtures_dir / "clip2video_tiny.pt", "config": fixtures_dir / "clip2video_tiny_config.json",
          "sd": load_state_dict(fixtures_dir / "clip2video_tiny.pt"), "io": io}


@pytest.fixture(scope="module")
def outputs(fixture):
  """Every named output of the converted fixture model on the fixture's batch and on its padded video."""
  converted = convert_c2v.convert(fixture["sd"], json.loads(fixture["config"].read_text()), "fixture")
  model = kinds.build_model(converted.kind, converted.config, converted.params)
  graph, state = nnx.split(model)
  run = jax.jit(lambda s, *a: nnx.merge(graph, s)(*a))
  io = fixture["io"]
  main = run(state, io["video"], io["video_mask"], io["text_ids"], io["text_mask"])
  padded = run(state, io["padded_video"], io["padded_video_mask"], io["text_ids"], io["text_mask"])
  return converted, model, main, padded


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_config_from_weights_and_task_options(outputs):
  cfg = outputs[0].config
  assert (cfg.sim_type, cfg.temporal_type, cfg.temporal_proj, cfg.center_type, cfg.center_proj) == (
      "seqTransf", "TDB", "sigmoid_selfA", "TAB", "TAB_TDB")
  assert (cfg.center_k, cfg.center_weight, cfg.temporal_layers, cfg.num_frames, cfg.frame_positions) == (3, 0.5, 1, 6, 16)
  assert (cfg.width, cfg.temporal_heads, cfg.clip.vision.heads, cfg.clip.text.heads) == (512, 8, 1, 8)
  assert (cfg.clip.text.vocab_size, cfg.clip.text.max_len, cfg.clip.vision.layers) == (1000, 16, 2)


@pytest.mark.parametrize("ours,ref", [("frame_embeds", "frame_embeds"), ("text_embeds", "text_embeds"),
                                      ("text_token_embeds", "text_token_embeds"), ("logits_global", "logits_tdb"),
                                      ("tab_video", "tab_video"), ("tab_text", "tab_text"),
                                      ("logits", "logits_inference")])
def test_fixture_parity(outputs, fixture, ours, ref):
  assert _err(outputs[2][ours], fixture["io"][ref]) <= TOL


def test_padded_frames_parity(outputs, fixture):
  io, padded = fixture["io"], outputs[3]
  assert _err(padded["frame_embeds"], io["padded_frame_embeds"]) <= TOL
  assert _err(padded["logits"], io["padded_logits_inference"]) <= TOL


def test_training_loss_parity(outputs, fixture):
  _, model, main, _ = outputs
  loss, parts = model.loss(main)
  assert _err(loss, fixture["io"]["train_loss"]) <= TOL
  assert _err(parts["loss_tab"], fixture["io"]["train_tab_loss"]) <= TOL


def test_dual_encoder_reproduces_inference_logits(outputs, fixture):
  """encode_text . encode_video = w e^s t_g.v_g + (1 - w) e^s t_a.v_a, the original's inference score."""
  _, model, _, _ = outputs
  io = fixture["io"]
  encode = nnx.jit(lambda m, *a: (m.encode_text(*a[:2]), m.encode_video(*a[2:])))
  text, video = encode(model, *(jnp.asarray(io[k]) for k in ("text_ids", "text_mask", "video", "video_mask")))
  assert text.shape == video.shape == (2, 1024)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(video), axis=-1), np.sqrt(np.exp(model.clip.logit_scale[...])),
                             rtol=1e-5)
  assert _err(model.similarity(text, video), io["logits_inference"]) <= TOL


@pytest.mark.slow  # compiles the API's encoders afresh
def test_load_pretrained_with_mixed_frame_masks(fixture):
  """load_pretrained(original file, config=JSON path) -> the fixture's scores, with the padded video batched
  beside two full ones: batch-major masks keep every video's score what it is alone."""
  io = fixture["io"]
  model = load_pretrained(fixture["pt"], config=fixture["config"])
  assert model.kind == "clip2video"
  videos = np.concatenate([io["video"], io["padded_video"]])
  masks = np.concatenate([io["video_mask"], io["padded_video_mask"]])
  scores = model.similarity(model.encode_text(io["text_ids"], io["text_mask"]), model.encode_video(videos, masks))
  assert _err(scores[:, :2], io["logits_inference"]) <= TOL
  assert _err(scores[:, 2:], io["padded_logits_inference"]) <= TOL


@pytest.mark.slow  # an Orbax round trip and fresh compiles
def test_cli_converted_directory(fixture, tmp_path):
  from clipvip_jax.convert.__main__ import main as convert_main
  out = tmp_path / "converted"
  assert convert_main([str(fixture["pt"]), "--out", str(out), "--config", str(fixture["config"])]) == 0
  io = fixture["io"]
  model = load_pretrained(out)
  scores = model.similarity(model.encode_text(io["text_ids"], io["text_mask"]),
                            model.encode_video(io["video"], io["video_mask"]))
  assert _err(scores, io["logits_inference"]) <= TOL


def test_options_inferred_from_the_weights_without_config(fixture, outputs):
  cfg = convert_c2v.infer_config(fixture["sd"], None)
  assert cfg == outputs[0].config.replace(num_frames=12)  # only the frame count needs the task options


@pytest.mark.parametrize("options,message", [
    ({"centerK": 5}, "centerK = 5, but weight_center has 3 rows"),
    ({"cross_num_hidden_layers": 4}, "cross_num_hidden_layers = 4, but the weights hold 1 transformerClip"),
    ({"vocab_size": 49408}, r"vocab_size = 49408 \(weights: 1000\)"),
    ({"center_proj": "bogus"}, "center_proj = 'bogus'"),
])
def test_config_disagreeing_with_the_weights_is_named(fixture, options, message):
  with pytest.raises(ConversionError, match=message):
    convert_c2v.convert(fixture["sd"], options, "fixture")


def test_bad_keys_are_named(fixture):
  sd = fixture["sd"]
  with pytest.raises(ParamMismatchError, match=r"unexpected keys \(1\): lstm_visual\.weight_ih_l0"):
    convert_c2v.convert({**sd, "lstm_visual.weight_ih_l0": np.zeros((4, 4))}, None, "seqLSTM")
  with pytest.raises(ParamMismatchError, match=r"missing keys \(1\): actionClip\.resblocks\.0\.ln_2\.bias"):
    convert_c2v.convert({k: v for k, v in sd.items() if k != "actionClip.resblocks.0.ln_2.bias"}, None, "broken")
  with pytest.raises(ParamMismatchError, match=r"wrong shape for emb_center: \(3, 511\)"):
    convert_c2v.convert({**sd, "emb_center": np.zeros((3, 511), np.float32)}, None, "misshaped")


def test_detection_in_the_format_registry(fixture):
  from clipvip_jax.convert.formats import detect_format
  assert detect_format(fixture["sd"]) == "clip2video"
  assert convert_c2v.detect(fixture["sd"]) and not openai_clip.detect(fixture["sd"])


# ---- other configurations: round trips through the original's naming ----

VARIANTS = {
    "clip4clip_meanP": dict(sim_type="meanP", center_type="default"),
    "clip4clip_seqTransf": dict(temporal_type="default", center_type="default", temporal_layers=2),
    "tdb_mlp_tab": dict(temporal_proj="sigmoid_mlp", center_proj="TAB", center_k=7, temporal_layers=3),
    "tdb_default_tab_default": dict(temporal_proj="default", center_proj="default", center_k=2, center_weight=0.3),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_and_scores_of_other_configurations(name):
  """Random weights of a variant -> the original's state dict (float16, as released) -> convert with the task
  options -> the same parameters; and the dual-encoder scores equal the logits the variant defines."""
  cfg = CLIP2VideoConfig.for_clip(_tiny_clip(), num_frames=5, **VARIANTS[name])
  params = random_params(shapes(nnx.eval_shape(lambda: CLIP2Video(cfg, rngs=nnx.Rngs(0)))), seed=7)
  sd = {k: v.astype(np.float16).astype(np.float32) for k, v in convert_c2v.from_params(params, cfg).items()}
  # The original's task options always name every head option, used or not.
  options = {k: getattr(cfg, k) for k in ("sim_type", "temporal_type", "temporal_proj", "center_type",
                                          "center_proj", "center_weight")}
  converted = convert_c2v.convert(sd, {**options, "num_frames": 5}, name)
  assert converted.config == cfg
  back = convert_c2v.from_params(converted.params, cfg)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  model = kinds.build_model("clip2video", cfg, converted.params)
  rng = np.random.default_rng(0)
  video = rng.standard_normal((2, 5, 16, 16, 3)).astype(np.float32)
  frame_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  ids = np.array([[48, 5, 7, 49, 0, 0], [48, 9, 3, 4, 2, 49]])
  mask = (ids > 0).astype(np.int32)
  run = nnx.jit(lambda m, *a: (m(*a), m.similarity(m.encode_text(*a[2:]), m.encode_video(*a[:2]))))
  out, scores = run(model, jnp.asarray(video), jnp.asarray(frame_mask), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(scores), np.asarray(out["logits"]), atol=1e-5)
  assert ("logits_tab" in out) == cfg.uses_tab


def test_unused_head_weights_are_dropped_with_a_warning():
  """The original builds trans_layernorm whatever the options; a meanP checkpoint may carry it unused."""
  cfg = CLIP2VideoConfig.for_clip(_tiny_clip(), sim_type="meanP", center_type="default")
  params = random_params(shapes(nnx.eval_shape(lambda: CLIP2Video(cfg, rngs=nnx.Rngs(0)))), seed=1)
  width = cfg.width
  sd = convert_c2v.from_params(params, cfg) | {"trans_layernorm.weight": np.ones(width, np.float32),
                                                "trans_layernorm.bias": np.zeros(width, np.float32)}
  with pytest.warns(UserWarning, match="trans_layernorm.bias, trans_layernorm.weight"):
    converted = convert_c2v.convert(sd, None, "meanP")
  assert converted.config.sim_type == "meanP" and not converted.config.uses_tab


# ---- training from CLIP ----

def test_init_from_clip_copies_text_layers_as_the_original():
  clip_cfg = _tiny_clip()
  clip_params = random_params(shapes(nnx.eval_shape(lambda: kinds.model_class("clip")(clip_cfg,
                                                                                        rngs=nnx.Rngs(0)))), seed=2)
  model = convert_c2v.init_from_clip(clip_params, clip_cfg, rng=3, center_k=4, temporal_layers=2,
                                     temporal_proj="sigmoid_selfA")
  cfg = model.cfg
  assert (cfg.frame_positions, cfg.temporal_heads, cfg.temporal_mlp_dim) == (16, 2, 256)
  pos = clip_params["text/position_embedding"]
  np.testing.assert_array_equal(model.frame_position_embeddings[...], pos)
  np.testing.assert_array_equal(model.difference.type_embedding[...], pos[:2])
  for i in range(2):
    np.testing.assert_array_equal(model.temporal_transformer.blocks[i].attn.query.kernel[...],
                                  clip_params[f"text/encoder/blocks/{i}/attn/query/kernel"])
  for module in (model.difference.attention, model.action_transformer):
    np.testing.assert_array_equal(module.blocks[0].mlp.fc2.kernel[...], clip_params["text/encoder/blocks/0/mlp/fc2/kernel"])
  np.testing.assert_array_equal(model.difference.norm.scale[...], np.ones(cfg.width))
  centres = np.asarray(model.alignment.emb_center[...])
  assert centres.shape == (4, cfg.width) and 0.08 < centres.std() < 0.17  # N(0, 64^-0.5 = 0.125)
  np.testing.assert_array_equal(model.clip.logit_scale[...], clip_params["logit_scale"])
  with pytest.raises(ValueError, match="temporal_layers = 3 exceeds the CLIP's 2 text layers"):
    convert_c2v.init_from_clip(clip_params, clip_cfg, temporal_layers=3)


# ---- the recipes ----

@pytest.mark.parametrize("recipe,center_k", [("msrvtt", 5), ("msvd", 5), ("vatex", 7)])
def test_recipe_configs_build(recipe, center_k):
  """Each recipe gives a valid data config and the spec's CLIP2Video on ViT-B/32 (checked abstractly)."""
  import importlib.util
  import pathlib
  from clipvip_jax.train import model_init
  from data_pipelines.pipeline import DataConfig
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"clip2video_{recipe}.py"
  spec = importlib.util.spec_from_file_location(f"clip2video_{recipe}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert f"--config configs/clip2video_{recipe}.py" in module.__doc__
  DataConfig.from_config({**c.data.to_dict(), "shard_dir": "shards"})
  cfg = model_init.model_config(c.model)
  assert (cfg.center_k, cfg.temporal_layers, cfg.temporal_heads, cfg.frame_positions, cfg.width) == (center_k, 4, 8,
                                                                                                       77, 512)
  assert (c.data.num_frames, c.data.max_text_len, c.data.batch_size, c.optim.name) == (12, 32, 128, "bert_adam")
  assert model_init.model_config(module.get_config("runlocal").model).width == 64
