"""The reference optimisers against the originals' update rules computed by hand on scalars."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipvip_jax.train import optim

B1, B2, EPS = 0.9, 0.98, 1e-6


def _params():
  return {"encoder": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])},
          "head": {"kernel": jnp.array([3.0])}, "embedding": jnp.array([0.25]), "logit_scale": jnp.array(4.6)}


def _grads():
  return {"encoder": {"kernel": jnp.array([0.5, -0.1]), "bias": jnp.array([0.2])},
          "head": {"kernel": jnp.array([-1.0])}, "embedding": jnp.array([0.3]), "logit_scale": jnp.array(0.4)}


def _hand_adamw(p, grads, lr, wd):
  """HF/ClipBERT AdamW on one scalar: bias-corrected step size, eps outside the correction, decay after the step."""
  m = v = 0.0
  for t, g in enumerate(grads, start=1):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    step_size = lr * math.sqrt(1 - B2**t) / (1 - B1**t)
    p = p - step_size * m / (math.sqrt(v) + EPS)
    p = p - lr * wd * p
  return p


def _hand_bert_adam(p, grads, lrs, wd):
  m = v = 0.0
  for g, lr in zip(grads, lrs):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    p = p - lr * (m / (math.sqrt(v) + EPS) + wd * p)
  return p


def _leaf(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def _run(tx, params, grads_per_step):
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    params = optim.apply_updates(params, updates)
  return params, state


def test_adamw_matches_hand_computed_updates_with_decay_exclusions_multiplier_and_freezing():
  lr, wd = 0.1, 0.2
  params = _params()
  rules = optim.param_rules(params, lr_multipliers=[(r"^head/", 10.0)], frozen=[r"^embedding$"])
  tx = optim.reference_adam(lambda count: jnp.float32(lr), rules, b1=B1, b2=B2, eps=EPS, weight_decay=wd)
  g1, g2 = _grads(), jax.tree.map(lambda g: -0.5 * g + 0.05, _grads())
  out, state = _run(tx, params, [g1, g2])

  def hand(name, index, p0, lr_=lr, wd_=wd):
    gs = [float(np.asarray(_leaf(g, name)).reshape(-1)[index]) for g in (g1, g2)]
    return _hand_adamw(p0, gs, lr_, wd_)

  # Weights (and LayerNorm gains, embeddings...) decay; biases and logit_scale do not.
  np.testing.assert_allclose(out["encoder"]["kernel"], [hand("encoder/kernel", 0, 1.0), hand("encoder/kernel", 1, -2.0)], rtol=1e-6)
  np.testing.assert_allclose(out["encoder"]["bias"], [hand("encoder/bias", 0, 0.5, wd_=0.0)], rtol=1e-6)
  np.testing.assert_allclose(out["logit_scale"], hand("logit_scale", 0, 4.6, wd_=0.0), rtol=1e-6)
  # The multiplier scales the lr of the step and of the decay.
  np.testing.assert_allclose(out["head"]["kernel"], [hand("head/kernel", 0, 3.0, lr_=10 * lr)], rtol=1e-6)
  # Frozen: bit-identical, and no moments are kept for it.
  np.testing.assert_array_equal(out["embedding"], params["embedding"])
  assert isinstance(state.mu["embedding"], optax.MaskedNode) and isinstance(state.nu["embedding"], optax.MaskedNode)
  assert int(state.count) == 2


def test_decay_is_applied_after_the_adam_step_not_before():
  # With a huge decay the two orders differ visibly: after-step gives (p - lr*a)(1 - lr*wd).
  params = {"w": jnp.array([2.0])}
  rules = optim.param_rules(params)
  tx = optim.reference_adam(lambda c: jnp.float32(0.5), rules, weight_decay=1.0)
  out, _ = _run(tx, params, [{"w": jnp.array([1.0])}])
  adam = math.sqrt(1 - B2) / (1 - B1) * 0.1 / (math.sqrt(0.02) + EPS)  # t=1: m=0.1, v=0.02
  expected = (2.0 - 0.5 * adam) * (1 - 0.5)
  np.testing.assert_allclose(out["w"], [expected], rtol=1e-6)
  assert abs(float(out["w"][0]) - (2.0 - 0.5 * adam - 0.5 * 2.0)) > 0.1


def test_bert_adam_no_bias_correction_decay_on_old_params_and_zero_first_lr():
  params = {"clip": {"w": jnp.array([1.0]), "bias": jnp.array([1.0])}, "head": {"w": jnp.array([-1.0])}}
  rules = optim.param_rules(params, lr_multipliers=[(r"^clip/", 1e-3)])
  total, base = 10, 1e-1
  schedule = optim.bert_warmup_cosine(base, total, 0.1)
  tx = optim.reference_adam(schedule, rules, weight_decay=0.2, variant="bert_adam")
  grads = [0.3, -0.2, 0.1]
  out, _ = _run(tx, params, [jax.tree.map(lambda p: jnp.full_like(p, g), params) for g in grads])
  # progress x = count/total: 0 (warmup: lr 0), 0.1 (cosine of the whole run), 0.2.
  lrs = [0.0, base * 0.5 * (1 + math.cos(math.pi * 0.1)), base * 0.5 * (1 + math.cos(math.pi * 0.2))]
  np.testing.assert_allclose(out["head"]["w"], [_hand_bert_adam(-1.0, grads, lrs, 0.2)], rtol=1e-6)
  np.testing.assert_allclose(out["clip"]["w"], [_hand_bert_adam(1.0, grads, [1e-3 * x for x in lrs], 0.2)],
                             rtol=1e-6)
  np.testing.assert_allclose(out["clip"]["bias"], [_hand_bert_adam(1.0, grads, [1e-3 * x for x in lrs], 0.0)],
                             rtol=1e-6)


def test_clipvip_warmup_cosine_schedule_values():
  s = optim.warmup_cosine(1.0, total_steps=100, warmup_fraction=0.1, floor=1e-8)
  # The k-th update (count k-1): k/10 during warmup, then the cosine from step 10 to 100, floor at the end.
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(8)) == pytest.approx(0.9)
  assert float(s(9)) == pytest.approx(1.0)
  assert float(s(54)) == pytest.approx(0.5, abs=1e-6)
  assert float(s(99)) == pytest.approx(1e-8)
  assert float(s(150)) > 0  # overrun: cos comes back up, as the original's formula


def test_global_norm_clipping_runs_before_adam():
  params = {"w": jnp.array([1.0, 1.0])}
  cfg = {"name": "adamw", "lr": 0.1, "weight_decay": 0.0, "grad_clip_norm": 1.0, "schedule": "constant"}
  tx, _, _ = optim.make_optimizer(cfg, params, total_steps=10)
  state = tx.init(params)
  big = {"w": jnp.array([30.0, 40.0])}  # norm 50 -> clipped to [0.6, 0.8]
  _, state = tx.update(big, state, params)
  adam_state = state[1]
  np.testing.assert_allclose(adam_state.mu["w"], 0.1 * np.array([0.6, 0.8]), rtol=1e-6)


def test_pattern_matching_no_parameter_is_an_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.param_rules(_params(), frozen=[r"^vision/patch"])
  with pytest.raises(ValueError, match="not a regular expression"):
    optim.param_rules(_params(), frozen=["("])


def test_global_clip_uses_torch_arithmetic_norm_plus_1e6():
  # clip_grad_norm_: g * max_norm / (norm + 1e-6) when that is below 1; unchanged otherwise.
  tx = optim.clip_by_global_norm(1.0)
  grads = {"w": jnp.array([3.0, 4.0])}
  out, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(out["w"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-7)
  small = {"w": jnp.array([0.3, 0.4])}
  np.testing.assert_array_equal(tx.update(small, tx.init(small))[0]["w"], small["w"])


def test_bert_adam_clips_each_original_tensor_with_split_parts_joined():
  """BertAdam's per-tensor clip_grad_norm_(p, 1.0): query/key/value of one fused in_proj clipped on their joint
  norm, every other tensor on its own; frozen tensors are left alone."""
  params = {"attn": {"query": {"kernel": jnp.zeros(2)}, "key": {"kernel": jnp.zeros(2)},
                     "value": {"kernel": jnp.zeros(2)}, "out": {"kernel": jnp.zeros(2)}},
            "frozen": jnp.zeros(1)}
  rules = optim.param_rules(params, frozen=[r"^frozen$"],
                            clip_units=[(r"/(query|key|value)/(kernel|bias)$", r"/in_proj/\2")])
  assert {r.clip_unit for r in jax.tree.leaves(rules) if "attn" in r.name} == {"attn/in_proj/kernel",
                                                                               "attn/out/kernel"}
  grads = {"attn": {"query": {"kernel": jnp.array([2.0, 0.0])}, "key": {"kernel": jnp.array([0.0, 2.0])},
                    "value": {"kernel": jnp.array([1.0, 0.0])}, "out": {"kernel": jnp.array([0.6, 0.8])}},
           "frozen": jnp.array([5.0])}
  out = optim.clip_per_tensor(grads, rules, 1.0)
  joint = 1.0 / (3.0 + 1e-6)  # |(2, 0, 0, 2, 1, 0)| = 3
  np.testing.assert_allclose(out["attn"]["query"]["kernel"], [2.0 * joint, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["attn"]["value"]["kernel"], [joint, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["attn"]["out"]["kernel"], [0.6, 0.8], rtol=1e-6)  # norm 1: min(1, 1/(1+1e-6))
  np.testing.assert_array_equal(out["frozen"], [5.0])
  # Inside the optimiser the clipped gradient is what enters the moments.
  tx = optim.reference_adam(lambda c: jnp.float32(0.1), rules, variant="bert_adam", per_tensor_clip_norm=1.0)
  _, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(state.mu["attn"]["key"]["kernel"], [0.0, 0.1 * 2.0 * joint], rtol=1e-6)


def test_clamp_rules_act_before_or_after_the_update():
  params = {"logit_scale": jnp.array(5.5), "w": jnp.array([9.0])}
  before = optim.param_rules(params, clamp=[(r"^logit_scale$", 0.0, math.log(200.0))], clamp_when="before_update")
  after = optim.param_rules(params, clamp=[(r"^logit_scale$", None, math.log(100.0))], clamp_when="after_update")
  assert float(optim.clamp_params(params, before, "before_update")["logit_scale"]) == pytest.approx(math.log(200))
  assert float(optim.clamp_params(params, before, "after_update")["logit_scale"]) == 5.5
  assert float(optim.clamp_params(params, after, "after_update")["logit_scale"]) == pytest.approx(math.log(100))
  low = {"logit_scale": jnp.array(-3.0), "w": jnp.array([9.0])}
  assert float(optim.clamp_params(low, after, "after_update")["logit_scale"]) == -3.0  # no lower bound
  assert float(optim.clamp_params(low, before, "before_update")["logit_scale"]) == 0.0
  np.testing.assert_array_equal(optim.clamp_params(params, before, "before_update")["w"], [9.0])
  with pytest.raises(ValueError, match="clamp_when"):
    optim.param_rules(params, clamp_when="after_backward")


def test_bert_schedule_spans_a_fractional_t_total():
  # CLIP4Clip: t_total = (int(batches + accum - 1) / accum) * epochs, e.g. 13 / 4 = 3.25 updates.
  cfg = {"name": "bert_adam", "lr": 1.0, "schedule": "bert_warmup_cosine", "warmup_fraction": 0.1,
         "schedule_steps": 3.25}
  _, schedule, _ = optim.make_optimizer(cfg, {"w": jnp.zeros(1)}, total_steps=4)
  assert float(schedule(1)) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3.25)), rel=1e-6)
  with pytest.raises(ValueError, match="whole updates"):
    optim.make_optimizer({"lr": 1.0, "schedule_steps": 3.25}, {"w": jnp.zeros(1)}, total_steps=4)
