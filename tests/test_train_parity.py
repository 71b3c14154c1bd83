"""Training parity with the originals, update by update, through the trainer's own path.

Each `*_train_steps.{json,npz}` fixture (../shared/fixtures, or $CLIPVIP_FIXTURES) holds real updates of an
original: the inputs of every update, its loss, the lr of every parameter group, the pre-clip gradient norm and
the parameters after some updates. Here the same updates run through trainer.setup_training (model_init from the
fixture's checkpoint file and config, optim.make_optimizer, step.make_train_step) with the recipe config of the
model's kind, overridden only by the settings the fixture's JSON states (lr, betas, eps, decay, clip norms,
schedule lengths, multipliers). The rules that are not settings (which names decay, which are frozen, the clamp
and when it acts, BertAdam's per-tensor clip, where eps sits, the schedule's step counting) come from the recipe
config, so a recipe that drifts from its original fails here: against the fixture's parameter groups directly,
and against its losses and parameters.

Nothing about a particular fixture is written here: file names, sizes, step counts and settings all come from
the JSON, so another fixture of the same format under the same names runs unchanged. Float32 throughout; the
fixture README gives the tolerances (losses 1e-5 relative, parameters about 1e-5 absolute).
"""

import dataclasses
import functools
import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest

from clipvip_jax.convert import clip2video as convert_c2v
from clipvip_jax.convert import clipvip as convert_vip
from clipvip_jax.convert import hf_clip
from clipvip_jax.convert.common import load_state_dict, read_config
from clipvip_jax.convert.formats import convert
from clipvip_jax.train import optim, sharding, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
STEMS = ("clipvip_train_steps", "clip2video_train_steps")  # the fixture format's file names
RECIPE = {"clipvip": "configs/clipvip_msrvtt.py", "clip2video": "configs/clip2video_msrvtt.py"}
FAMILY = {"clipvip": "configs/clipvip_*.py", "clip2video": "configs/clip2video_*.py"}
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5
# Gradient norms: the originals' float32 weight gradients (sums over every token of the batch) are themselves off
# a float64 evaluation of the same model by up to 6e-5 per tensor and 1.5e-5 on the global norm (CLIP2Video's
# mlp and in_proj weights, measured); ours agree with float64 to 2e-5 per tensor. Hence 1e-4 on the global norm
# and 1e-3 per tensor. A tensor whose gradient is exactly zero but for rounding (a key bias of its own, see
# SHIFT_INVARIANT) has no relative precision: both norms must only be rounding-sized, within 1e-5 of the global
# norm. A wrong rule (a clamp moment, a frozen or undecayed tensor) moves them by far more.
NORM_RTOL, TENSOR_NORM_RTOL, TENSOR_NORM_ATOL = 1e-4, 1e-3, 1e-5
# Attention key biases: a key bias b adds q.b to every logit of query q, and a softmax over the keys does not
# change when all of a query's logits shift together, so these parameters change no output and their gradient is
# exactly zero in exact arithmetic. What a float32 backward leaves there is rounding noise, and Adam normalises any
# gradient to a step of about lr (m / sqrt(v)), so no two implementations agree on these updates to 1e-5. The
# principled rule instead: each update moves them by at most Adam's bound (`adam_step_bound`), and changing them
# does not change the model's outputs (test_key_biases_change_no_output). Every other parameter: PARAM_ATOL.
SHIFT_INVARIANT = re.compile(r"(^|/)attn/key/bias$")


@dataclasses.dataclass
class Fixture:
  stem: str
  dir: pathlib.Path
  meta: dict
  arrays: dict
  kind: str
  model_cfg: object  # the converted checkpoint's config
  names: dict  # original tensor name -> our parameter names (several for a fused tensor)

  @property
  def num_steps(self) -> int:
    return int(self.arrays.get("num_steps", self.meta["batch"]["num_steps"]))

  def stored_params(self) -> dict[int, dict[str, np.ndarray]]:
    """{update k (1-based): original state dict after it}: params_step{k}/ and params_final/ (after the last)."""
    out: dict[int, dict] = {}
    for key, value in self.arrays.items():
      m = re.fullmatch(r"params_(step(\d+)|final)/(.+)", key)
      if m:
        k = int(m.group(2)) if m.group(2) else self.num_steps
        out.setdefault(k, {})[m.group(3)] = value
    return out


def _original_names(kind: str, cfg) -> dict[str, tuple[str, ...]]:
  """The converters' key tables: original name -> our names."""
  if kind == "clipvip":
    table = {convert_vip.PREFIX + hf: (ours,) for hf, ours, *_ in hf_clip.key_table(cfg.clip)}
    table.update({convert_vip.PREFIX + k: (v,) for k, v in convert_vip.NEW_PARAMS.items()})
    return table
  if kind == "clip2video":
    out = {}
    for src, ours, *_ in convert_c2v.key_items(cfg):
      assert len(src) == 1
      out[src[0]] = tuple(ours)
    return out
  raise AssertionError(f"no training recipe for kind {kind!r}")


@functools.lru_cache(maxsize=None)
def _load(fixtures_dir: pathlib.Path, stem: str) -> Fixture:
  meta = json.loads((fixtures_dir / f"{stem}.json").read_text())
  arrays = dict(np.load(fixtures_dir / f"{stem}.npz"))
  model = meta["model"]
  converted = convert(load_state_dict(fixtures_dir / model["checkpoint"]),
                      read_config(fixtures_dir / model["config"]), source=model["checkpoint"])
  return Fixture(stem, fixtures_dir, meta, arrays, converted.kind, converted.config,
                 _original_names(converted.kind, converted.config))


@pytest.fixture(scope="module", params=STEMS)
def fx(request, fixtures_dir) -> Fixture:
  if not (fixtures_dir / f"{request.param}.json").is_file():
    pytest.fail(f"{fixtures_dir} lacks {request.param}.json")
  return _load(fixtures_dir, request.param)


# ------------------------------------------------------------------------------------------------ fixture -> config


def _is_bert_adam(meta) -> bool:
  return meta["optimizer"]["class"].startswith("BertAdam")


def _ours(fx: Fixture, original_names) -> list[str]:
  return [n for o in original_names for n in fx.names[o]]


def _regex_of(names) -> str:
  return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def recipe_config(fx: Fixture, recipe: str | None = None):
  """The recipe config of the fixture's model kind with the fixture's settings: (config, total_steps)."""
  from clipvip_jax.train.cli import load_config
  meta = fx.meta
  config = load_config(str(REPO / (recipe or RECIPE[fx.kind])))
  config.model.update(dtype="float32", remat="none", attention="xla", scan_layers=False)
  model = meta["model"]
  config.init = dict(checkpoint=str(fx.dir / model["checkpoint"]), config=str(fx.dir / model["config"]), skip=(),
                     logit_scale=model.get("overload_logit_scale"))
  config.grad_accum = 1
  opt, sched, clip = meta["optimizer"], meta["schedule"], meta["grad_clip"]
  o = config.optim
  if _is_bert_adam(meta):
    # CLIP4Clip: coef_lr scales the CLIP weights' lr; the recipe's one multiplier is that rule.
    assert len(o.lr_multipliers) == 1, o.lr_multipliers
    o.update(lr=opt["lr"], b1=opt["b1"], b2=opt["b2"], eps=opt["e"], weight_decay=opt["weight_decay"],
             grad_clip_norm=clip["global"], per_tensor_clip_norm=opt["max_grad_norm"],
             warmup_fraction=sched["warmup"], schedule_steps=sched["t_total"],
             lr_multipliers=((o.lr_multipliers[0][0], opt["coef_lr"]),))
    total = math.ceil(sched["t_total"])
  else:
    # CLIP-ViP: lr_mul on the names that contain lr_mul_prefix (the original's generic option), in our names.
    mult = float(opt.get("lr_mul", 1.0))
    hits = [n for n in fx.names if opt.get("lr_mul_prefix") and opt["lr_mul_prefix"] in n]
    o.update(lr=sched["learning_rate"], b1=opt["betas"][0], b2=opt["betas"][1], eps=opt["eps"],
             weight_decay=opt["weight_decay"], grad_clip_norm=clip["max_norm"],
             warmup_fraction=sched["warmup_ratio"], schedule_steps=0,
             lr_multipliers=((_regex_of(_ours(fx, hits)), mult),) if mult != 1.0 and hits else ())
    total = int(sched["num_train_steps"])
  return config, total


def _rules(config):
  return tuple(tuple(r) for r in config.sharding_rules)


def fixture_batch(fx: Fixture, k: int) -> dict[str, np.ndarray]:
  """The inputs of update k (0-based) in our layout: video [B, T, H, W, C]."""
  a = fx.arrays
  video = np.moveaxis(a["video"][k], -3, -1).astype(np.float32)
  mask = a["video_mask"][k] if "video_mask" in a else np.ones(video.shape[:2])
  return {"video": video, "frame_mask": mask.astype(np.int32), "text_ids": a["text_ids"][k].astype(np.int32),
          "text_mask": a["text_mask"][k].astype(np.int32)}


@dataclasses.dataclass
class Run:
  setup: object
  losses: list
  parts: list
  grad_norms: list
  logit_forward: list  # logit_scale the forward of each update saw
  logit_clamped: list  # ... and after the clamps that act before the update
  params: dict  # {k: flat numpy params after k updates} (0 = the start) for the k stored, and the last


def run_updates(fx: Fixture, mesh_shape=(1, 1, 1), grad_accum: int = 1, batches=None, num_steps=None,
                store=None) -> Run:
  """The fixture's updates (or `batches(k)`'s) through trainer.setup_training on a mesh of `mesh_shape`."""
  config, total = recipe_config(fx)
  config.grad_accum = grad_accum
  mesh = sharding.make_mesh(mesh_shape)
  rules = _rules(config)
  setup = trainer.setup_training(config, mesh, rules, total)
  params, opt_state = setup.model.params, setup.opt_state
  num_steps = num_steps or fx.num_steps
  store = set(store if store is not None else range(num_steps))
  run = Run(setup, [], [], [], [], [], {})
  scale_name = next((n for n in optim.flat_names(params) if n.split("/")[-1] == "logit_scale"), None)

  def flat(p):
    return {n: np.asarray(x) for n, x in zip(optim.flat_names(p), jax.tree.leaves(p))}

  for k in range(num_steps):
    now = flat(params)
    if k in store:
      run.params[k] = now
    if scale_name:
      run.logit_forward.append(float(now[scale_name]))
      clamped = optim.clamp_params(params, setup.param_rules, "before_update")
      run.logit_clamped.append(float(flat(clamped)[scale_name]))
    batch = (batches or (lambda i: fixture_batch(fx, i)))(k)
    placed = {n: jax.device_put(v, sharding.batch_sharding(mesh, rules, v.ndim)) for n, v in batch.items()}
    params, opt_state, metrics = setup.train_step(params, opt_state, placed)
    assert bool(metrics["finite"])
    run.losses.append(float(metrics["loss"]))
    run.parts.append({n: float(v) for n, v in metrics.items() if n.startswith("loss_")})
    run.grad_norms.append(float(metrics["grad_norm"]))
  run.params[num_steps] = flat(params)
  return run


@pytest.fixture(scope="module")
def run(fx) -> Run:
  return run_updates(fx)


# ------------------------------------------------------------------------------------------------ the rules


def test_recipe_optimiser_schedule_and_clamp_are_the_originals(fx):
  meta = fx.meta
  config, _ = recipe_config(fx)
  o = config.optim
  if _is_bert_adam(meta):
    assert (o.name, o.schedule) == ("bert_adam", "bert_warmup_cosine") and meta["schedule"]["name"] == "warmup_cosine"
    assert not meta["optimizer"]["bias_correction"]
    # The clip norms are settings (taken from the fixture), but the recipe itself must clip per tensor as BertAdam
    # does whenever the original did.
    from clipvip_jax.train.cli import load_config
    own = load_config(str(REPO / RECIPE[fx.kind])).optim
    assert (own.per_tensor_clip_norm > 0) == (meta["optimizer"]["max_grad_norm"] > 0)
    assert (own.grad_clip_norm > 0) == (meta["grad_clip"]["global"] > 0)
  else:
    assert (o.name, o.schedule) == ("adamw", "warmup_cosine") and meta["schedule"]["decay"] == "cosine"
    assert meta["optimizer"]["correct_bias"] and o.per_tensor_clip_norm == 0
  clamp = meta["logit_scale_clamp"]
  ((pattern, lo, hi),) = o.clamp
  assert re.search(pattern, "logit_scale")
  assert lo == clamp.get("min") and hi == pytest.approx(clamp["max"], abs=1e-12)
  when = clamp["when"]
  expected = "before_update" if "before backward" in when else "after_update" if "after optimizer.step" in when else when
  assert o.clamp_when == expected


RULE_KEYS = ("name", "schedule", "b1", "b2", "eps", "no_decay", "frozen", "clamp", "clamp_when",
             "per_tensor_clip_norm", "per_tensor_clip_units")


@pytest.mark.parametrize("kind", sorted(RECIPE))
def test_every_recipe_of_a_kind_has_the_same_update_rules(kind):
  """The rules checked against the fixture hold for every recipe of that original, not only the one run here (the
  settings - lr, decay, clip norm, warmup, multipliers - are each recipe's own)."""
  from clipvip_jax.train.cli import load_config
  main = load_config(str(REPO / RECIPE[kind])).optim
  recipes = sorted(REPO.glob(FAMILY[kind]))
  assert len(recipes) > 1
  for path in recipes:
    o = load_config(str(path)).optim
    for key in RULE_KEYS:
      assert o.get(key) == main.get(key), f"{path.name}: optim.{key} = {o.get(key)!r}, {RECIPE[kind]} has {main.get(key)!r}"


def test_parameter_groups_lr_decay_and_freezing_match_the_fixture(fx, run):
  """Every parameter in the group the original put it in: its lr at every update (schedule x multiplier), weight
  decay or not, frozen or not; and every parameter of ours belongs to exactly one original tensor."""
  rules = {r.name: r for r in jax.tree.leaves(run.setup.param_rules)}
  groups = fx.meta["param_groups"]
  listed = [o for g in groups for o in g["params"]]
  assert sorted(listed) == sorted(fx.names), "the fixture's groups and the converter's tensors differ"
  assert sorted(n for o in listed for n in fx.names[o]) == sorted(rules)
  frozen = set(fx.meta.get("frozen_params", ()))
  config, _ = recipe_config(fx)
  lrs = fx.arrays["lr"]
  for g, group in enumerate(groups):
    decayed = group["weight_decay"] > 0
    if decayed:
      assert group["weight_decay"] == pytest.approx(config.optim.weight_decay)
    for original in group["params"]:
      for name in fx.names[original]:
        r = rules[name]
        assert r.frozen == (original in frozen), name
        assert r.decay == decayed, name
        if r.frozen:
          continue
        ours = [float(run.setup.schedule(k)) * r.lr_multiplier for k in range(fx.num_steps)]
        np.testing.assert_allclose(ours, lrs[:, g], rtol=1e-6, atol=1e-12, err_msg=f"lr of {name} (group {g})")


def test_per_tensor_clip_units_are_the_original_tensors(fx, run):
  rules = {r.name: r for r in jax.tree.leaves(run.setup.param_rules)}
  units = {}
  for original, ours in fx.names.items():
    assert len({rules[n].clip_unit for n in ours}) == 1, f"{original} is clipped in parts: {ours}"
    units.setdefault(rules[ours[0]].clip_unit, []).append(original)
  assert all(len(v) == 1 for v in units.values()), {u: v for u, v in units.items() if len(v) > 1}


# ------------------------------------------------------------------------------------------------ the updates


def test_losses_match_every_update(fx, run):
  np.testing.assert_allclose(run.losses, fx.arrays["loss"], rtol=LOSS_RTOL)
  if "tab_loss" in fx.arrays:
    np.testing.assert_allclose([p["loss_tab"] for p in run.parts], fx.arrays["tab_loss"], rtol=LOSS_RTOL)


def test_pre_clip_gradient_norms_match_every_update(fx, run):
  np.testing.assert_allclose(run.grad_norms, fx.arrays["grad_norm"], rtol=NORM_RTOL)


def test_pre_clip_gradient_norm_of_every_tensor_at_every_update(fx, run):
  """Each original tensor's gradient norm (our parts of a fused tensor together), from the recipe's objective at
  the parameters each update started from; frozen tensors have none (NaN in the fixture)."""
  from flax import nnx
  setup, a = run.setup, fx.arrays
  if "grad_norm_per_param" not in a:
    pytest.skip(f"{fx.stem} records no per-tensor gradient norms")
  ms, objective = setup.model, setup.objective
  rules = {r.name: r for r in jax.tree.leaves(setup.param_rules)}

  @jax.jit
  def grads(params, batch):
    def loss(p):
      model = nnx.merge(ms.graphdef, p, ms.rest)
      return objective.loss(model, objective.features(model, batch))[0]
    return jax.grad(loss)(params)

  for k in range(fx.num_steps):
    params = jax.tree.unflatten(jax.tree.structure(ms.params), [run.params[k][n] for n in optim.flat_names(ms.params)])
    g = grads(params, fixture_batch(fx, k))
    g = dict(zip(optim.flat_names(g), [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]))
    for original, expected in zip(a["param_order"], a["grad_norm_per_param"][k]):
      ours = fx.names[str(original)]
      if all(rules[n].frozen for n in ours):
        assert np.isnan(expected), f"{original} is frozen here, not in the original"
        continue
      norm = math.sqrt(sum(float(np.sum(g[n] ** 2)) for n in ours))
      if all(SHIFT_INVARIANT.search(n) for n in ours):  # rounding noise on both sides
        assert max(norm, float(expected)) <= TENSOR_NORM_ATOL * a["grad_norm"][k], f"update {k + 1}: {original}"
        continue
      np.testing.assert_allclose(norm, expected, rtol=TENSOR_NORM_RTOL, err_msg=f"update {k + 1}: {original}")


def test_logit_scale_seen_by_each_forward_and_after_the_clamp(fx, run):
  if "logit_scale_forward" not in fx.arrays:
    pytest.skip(f"{fx.stem} records no logit_scale per update")
  np.testing.assert_allclose(run.logit_forward, fx.arrays["logit_scale_forward"], rtol=0, atol=PARAM_ATOL)
  np.testing.assert_allclose(run.logit_clamped, fx.arrays["logit_scale_clamped"], rtol=0, atol=PARAM_ATOL)


def adam_step_bound(optim_cfg, t: int) -> float:
  """The most one Adam update t (from 1) can move a parameter, in units of its lr, whatever the gradients: by
  Cauchy-Schwarz |m_t| <= (1-b1)/sqrt(1-b2) sqrt(sum_{j<t} (b1^2/b2)^j) sqrt(v_t), times the "adamw" bias
  correction sqrt(1-b2^t)/(1-b1^t) (BertAdam has none). About 1 (Kingma and Ba's "at most lr"); 1.7 at most for
  b1 0.9, b2 0.98. Clipping scales the gradients and eps only shrinks the step, so neither raises it."""
  b1, b2 = float(optim_cfg.b1), float(optim_cfg.b2)
  rho = b1 * b1 / b2
  bound = (1 - b1) / math.sqrt(1 - b2) * math.sqrt(sum(rho**j for j in range(t)))
  return bound * (math.sqrt(1 - b2**t) / (1 - b1**t) if optim_cfg.name == "adamw" else 1.0)


def shift_invariant_moves(fx: Fixture, run: "Run", k: int) -> dict[str, float]:
  """{name: the most the rule lets a key bias move in updates 1..k}: sum of lr_t x multiplier x the Adam bound,
  plus the decoupled decay of a decayed one (none is in the recipes: biases are not decayed)."""
  optim_cfg = recipe_config(fx)[0].optim
  out = {}
  for rule in jax.tree.leaves(run.setup.param_rules):
    if SHIFT_INVARIANT.search(rule.name):
      start = float(np.max(np.abs(run.params[0][rule.name])))
      per_step = [float(run.setup.schedule(t - 1)) * rule.lr_multiplier
                  * (adam_step_bound(optim_cfg, t) + (optim_cfg.weight_decay * (start + 1.0) if rule.decay else 0.0))
                  for t in range(1, k + 1)]
      out[rule.name] = 0.0 if rule.frozen else sum(per_step)
  return out


def _assert_params_match(fx: Fixture, ours: dict, original_sd: dict, what: str, run: "Run", k: int) -> float:
  """Every parameter after update k within PARAM_ATOL of the original's, but the key biases: ours and the
  original's each within the Adam bound of where they started (the rule stated at SHIFT_INVARIANT)."""
  expected = convert(original_sd, read_config(fx.dir / fx.meta["model"]["config"]), source=what).params
  assert sorted(expected) == sorted(ours)
  real = [n for n in ours if not SHIFT_INVARIANT.search(n)]
  worst = max(float(np.max(np.abs(ours[n] - expected[n]))) for n in real)
  bad = {n: float(np.max(np.abs(ours[n] - expected[n]))) for n in real
         if not np.allclose(ours[n], expected[n], rtol=0, atol=PARAM_ATOL)}
  assert not bad, f"{what}: {len(bad)} parameters off by more than {PARAM_ATOL}: {sorted(bad.items())[:8]}"
  _assert_shift_invariant_moves(fx, run, k, {"ours": ours, "the original": expected}, what)
  return worst


def _assert_shift_invariant_moves(fx: Fixture, run: "Run", k: int, states: dict, what: str) -> None:
  moves = shift_invariant_moves(fx, run, k)
  assert moves, f"{what}: no attention key bias among the parameters (names like .../attn/key/bias)"
  for who, params in states.items():
    for n, limit in moves.items():
      moved = float(np.max(np.abs(params[n] - run.params[0][n])))
      assert moved <= limit * (1 + 1e-6) + 1e-7, f"{what}: {who} {n} moved {moved:.3g}, more than {limit:.3g}"


def test_parameters_after_every_stored_update(fx, run):
  stored = fx.stored_params()
  assert stored, f"{fx.stem} stores no parameters"
  for k, sd in sorted(stored.items()):
    _assert_params_match(fx, run.params[k], sd, f"{fx.stem} after update {k}", run, k)
  if bool(fx.arrays.get("step1_equals_start", False)):  # an update at lr 0 moves nothing
    for n, x in run.params[0].items():
      np.testing.assert_array_equal(run.params[1][n], x, err_msg=n)


def test_key_biases_change_no_output(fx, run):
  """The premise of the key-bias rule on this fixture's model: replacing every attention key bias by large random
  values leaves the loss and every feature the objective computes unchanged (float32 rounding), while the same
  change to the query biases moves them (the check can fail)."""
  from flax import nnx
  setup = run.setup
  ms, objective = setup.model, setup.objective
  batch = fixture_batch(fx, 0)

  @jax.jit
  def loss_and_features(params, batch):
    model = nnx.merge(ms.graphdef, params, ms.rest)
    features = objective.features(model, batch)
    return objective.loss(model, features)[0], features

  outputs = lambda params: loss_and_features(params, batch)

  def replaced(pattern):
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0, 1.0, x.shape).astype(np.float32) if re.search(pattern, optim.path_name(path))
        else x, ms.params)

  base_loss, base_features = outputs(ms.params)
  loss, features = outputs(replaced(SHIFT_INVARIANT.pattern))
  assert any(SHIFT_INVARIANT.search(n) for n in optim.flat_names(ms.params))
  np.testing.assert_allclose(float(loss), float(base_loss), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(features), jax.tree.leaves(base_features)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  moved, _ = outputs(replaced(r"(^|/)attn/query/bias$"))
  assert abs(float(moved) - float(base_loss)) > 1e-3 * abs(float(base_loss))


# ------------------------------------------------------------------------------------------------ other layouts
# The same updates with the batch split over 8 devices and with gradient accumulation. A fixture batch (3 or 2
# clips) does not divide over 8 devices or always into 2 micro-batches, so it is padded with rows that the
# step's `valid` mask leaves out of the loss (the input pipeline's corrupt-record mask: such a row is neither a
# positive nor a negative and contributes no gradient); the result must still be the fixture's.


def _need_devices(n: int) -> None:
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count={n})")


def padded_batches(fx: Fixture, multiple: int):
  """Update k's inputs padded to a multiple of `multiple` rows (copies of row 0, valid = 0)."""
  def batch(k):
    b = fixture_batch(fx, k)
    rows = next(iter(b.values())).shape[0]
    pad = -rows % multiple
    out = {n: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for n, v in b.items()}
    out["valid"] = np.concatenate([np.ones(rows, np.int32), np.zeros(pad, np.int32)])
    return out
  return batch


def _assert_matches_fixture(fx: Fixture, other: Run, run: Run, what: str) -> None:
  np.testing.assert_allclose(other.losses, fx.arrays["loss"], rtol=LOSS_RTOL, err_msg=what)
  np.testing.assert_allclose(other.grad_norms, fx.arrays["grad_norm"], rtol=NORM_RTOL, err_msg=what)
  for k, sd in sorted(fx.stored_params().items()):
    _assert_params_match(fx, other.params[k], sd, f"{what} after update {k}", run, k)
  k = max(run.params)
  for n, x in run.params[k].items():  # and the one-device run
    if not SHIFT_INVARIANT.search(n):
      np.testing.assert_allclose(other.params[k][n], x, rtol=0, atol=PARAM_ATOL, err_msg=f"{what}: {n}")


def test_fixture_updates_with_the_batch_split_over_8_devices(fx, run):
  _need_devices(8)
  other = run_updates(fx, mesh_shape=(8, 1, 1), batches=padded_batches(fx, 8))
  _assert_matches_fixture(fx, other, run, f"{fx.stem} on 8 devices")


def test_fixture_updates_with_gradient_accumulation(fx, run):
  other = run_updates(fx, grad_accum=2, batches=padded_batches(fx, 2))
  _assert_matches_fixture(fx, other, run, f"{fx.stem} with grad_accum=2")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape,grad_accum,multiple", [((8, 1, 1), 2, 16), ((2, 2, 2), 2, 4), (None, 1, 1)])
def test_fixture_updates_on_other_meshes(fx, run, mesh_shape, grad_accum, multiple):
  """Accumulation on 8 devices, FSDP + tensor parallelism, and the unpadded batch over gcd(B, 8) devices with the
  other devices splitting the parameters."""
  _need_devices(8)
  if mesh_shape is None:
    data = math.gcd(fx.arrays["video"].shape[1], 8)
    mesh_shape = (data, 1, 8 // data)
  other = run_updates(fx, mesh_shape=mesh_shape, grad_accum=grad_accum,
                      batches=padded_batches(fx, multiple) if multiple > 1 else None)
  _assert_matches_fixture(fx, other, run, f"{fx.stem} on {mesh_shape} with grad_accum={grad_accum}")
