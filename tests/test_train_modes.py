"""The other training modes through the real step: omnisource pretraining (the loss is the registered omnisource
loss of the model's own features) and the CLIP2Video recipe (BertAdam, CLIP lr x coef, frozen embeddings)."""

import jax
import numpy as np
import pytest

from clipvip_jax import losses
from clipvip_jax.train import sharding, trainer
from clipvip_jax.train.cli import load_config

B, T, S, L = 4, 2, 16, 8


def _ids(rng):
  ids = rng.integers(1, 1000, (B, L)).astype(np.int32)
  ids[:, -1] = 49407
  return ids, np.ones((B, L), np.int32)


def _setup(config):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.sharding_rules)
  return trainer.setup_training(config, mesh, rules, total_steps=10)


def _tiny(kind):
  config = load_config(f"configs/tiny_test.py:{kind}")
  config.model.clip.vision.image_size = S
  config.model.clip.text.max_len = L
  return config


@pytest.mark.slow
def test_omnisource_step_loss_is_the_registered_loss_of_the_models_features():
  config = _tiny("clipvip")
  config.mode, config.loss = "omnisource", "NCELearnableTempLoss_vsc_fc"
  config.model.config.temporal_size = T
  setup = _setup(config)
  rng = np.random.default_rng(0)
  video = rng.normal(size=(B, T, S, S, 3)).astype(np.float32)
  batch = {"video": video, "frame_mask": np.ones((B, T), np.int32), "image": video[:, T // 2]}
  batch["subtitle_ids"], batch["subtitle_mask"] = _ids(rng)
  batch["caption_ids"], batch["caption_mask"] = _ids(rng)
  model = setup.model.model()
  expected = losses.omnisource_loss(model.encode_video(video, batch["frame_mask"]),
                                    model.encode_text(batch["subtitle_ids"], batch["subtitle_mask"]),
                                    model.encode_image(batch["image"]),
                                    model.encode_text(batch["caption_ids"], batch["caption_mask"]),
                                    model.logit_scale[...])
  _, _, metrics = setup.train_step(*jax.tree.map(lambda x: x.copy(), (setup.model.params, setup.opt_state)), batch)
  assert bool(metrics["finite"])
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_clip2video_recipe_freezes_embeddings_and_scales_the_clip_lr():
  config = load_config("configs/clip2video_msrvtt.py")
  tiny = _tiny("meanp")
  config.model.variant = "tiny"
  config.model.clip = tiny.model.clip
  config.model.clip.projection_dim = 32  # the temporal modules copy text layers: text width = embedding width
  config.model.config.update(temporal_layers=1, temporal_heads=2, temporal_mlp_dim=64, frame_positions=L,
                             center_k=3)
  config.model.dtype = "float32"
  config.init.checkpoint = ""
  config.optim.schedule = "constant"
  setup = _setup(config)
  rng = np.random.default_rng(1)
  ids, mask = _ids(rng)
  batch = {"video": rng.normal(size=(B, T, S, S, 3)).astype(np.float32), "frame_mask": np.ones((B, T), np.int32),
           "text_ids": ids, "text_mask": mask}
  from clipvip_jax.train.optim import flat_names
  before = dict(zip(flat_names(setup.model.params), map(np.asarray, jax.tree.leaves(setup.model.params))))
  params, opt_state, metrics = setup.train_step(setup.model.params, setup.opt_state, batch)
  after = dict(zip(flat_names(params), map(np.asarray, jax.tree.leaves(params))))
  assert bool(metrics["finite"]) and "loss_tab" in metrics
  for name in ("clip/text/token_embedding", "clip/vision/patch_embedding/kernel", "clip/vision/pre_layrnorm/scale"):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  # BertAdam, first step, no bias correction: delta = -lr_p m / sqrt(v) = -lr_p 0.1 g / (sqrt(0.02) |g|), i.e.
  # +-0.7071 lr_p, with lr_p = 1e-4 for the new modules and 1e-4 x 1e-3 for the CLIP towers. Biases: no decay, and
  # they start at 0, so a 1e-7 step is not lost to float32 rounding.
  for name, lr_p in (("temporal_transformer/blocks/0/mlp/fc1/bias", 1e-4),
                     ("clip/text/encoder/blocks/0/mlp/fc1/bias", 1e-7)):
    step = np.abs(after[name] - before[name]).max() / lr_p  # eps=1e-6 in the denominator shaves a little off
    assert 0.69 < step <= 0.1 / np.sqrt(0.02) + 1e-6, (name, step)
