"""The reference optimisers and learning-rate schedules, written out update by update.

Two recipes, each reproducing its original's arithmetic (not optax.adamw's, which differs in where eps and the
decay sit):

  "adamw" (CLIP-ViP, the HF/ClipBERT AdamW it ships):
      m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
      p <- p - lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)        bias correction on the step size
      p <- p - lr * wd * p                                               decay AFTER the Adam step (new p)
  "bert_adam" (CLIP4Clip's BertAdam, which the CLIP2Video recipe follows):
      p <- p - lr * (m / (sqrt(v) + eps) + wd * p)                       no bias correction, decay on the old p

Per-parameter behaviour comes from '/'-joined parameter names (clipvip_jax.params.flat_params keys) matched with
regular expressions (re.search):
  no_decay        names excluded from weight decay. The originals' list ('bias', 'LayerNorm.bias',
                  'LayerNorm.weight', 'logit_scale') matches only biases and logit_scale in these models (CLIP's
                  LayerNorms are named layer_norm1/ln_1, not LayerNorm): gains, embeddings, added_cls and
                  temporal_embedding ARE decayed.
  lr_multipliers  ((pattern, multiplier), ...): the first match scales that parameter's lr (CLIP-ViP's
                  lr_mul_prefix; CLIP4Clip's coef_lr for the CLIP towers). The decay uses the scaled lr too, as
                  the originals' per-group lr does.
  frozen          parameters that never change: zero update and no optimiser state (CLIP4Clip freezes the
                  patch embedding, class/position embeddings, ln_pre and the token embedding).
  clamp           ((pattern, min, max), ...): the value is clamped in place (None: that side open), when
                  `clamp_when` says. The originals clamp logit_scale, at different moments:
                    "before_update"  CLIP-ViP: after the forward and before backward, so the update is applied to
                                     the clamped value with the gradient of the unclamped one (the forward of that
                                     update saw the unclamped value); to [0, ln 200].
                    "after_update"   CLIP4Clip: after optimizer.step(); to at most ln 100, no lower bound.
  per_tensor_clip_norm, per_tensor_clip_units
                  BertAdam clips each tensor's gradient to norm max_grad_norm inside step(), after the global clip.
                  "Each tensor" means each tensor of the original: our converters split OpenAI's fused
                  attn.in_proj_weight/bias into query/key/value, so `per_tensor_clip_units` ((pattern,
                  replacement), ...) re.sub-rewrites our names to the original tensor's; parameters that end up
                  with the same name are clipped together on their joint norm.
Global-norm gradient clipping runs first, with torch.nn.utils.clip_grad_norm_'s arithmetic: all gradients times
max_norm / (norm + 1e-6) when that is below 1 (optax.clip_by_global_norm divides by the norm itself).
The schedule spans `schedule_steps` updates when set (CLIP4Clip's t_total may be fractional), else the run's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from clipvip_jax.params import path_name  # noqa: F401 (also imported from here by model_init)

Schedule = Callable[[jax.Array], jax.Array]

OPTIMIZERS = ("adamw", "bert_adam")
SCHEDULES = ("warmup_cosine", "bert_warmup_cosine", "constant")
CLAMP_WHEN = ("before_update", "after_update")
DEFAULT_NO_DECAY = (r"(^|/)bias$", r"(^|/)logit_scale$")
# CLIP-ViP's clamp, the default when a config names none (before this option existed the step clamped to the same
# range, after the update).
DEFAULT_CLAMP = ((r"(^|/)logit_scale$", 0.0, math.log(200.0)),)
CLIP_NORM_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6)


def flat_names(tree: Any) -> list[str]:
  return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ------------------------------------------------------------------------------------------------ schedules


def warmup_cosine(base_lr: float, total_steps: int, warmup_fraction: float, floor: float = 1e-8) -> Schedule:
  """CLIP-ViP's get_lr_sched(decay='cosine'): the k-th update (k = count + 1) uses
  lr * k/w for k < w = int(fraction * total), else lr * 0.5 (1 + cos(pi (k - w) / (total - w))); a value <= 0
  (the end of the cosine, or an overrun) is replaced by `floor`."""
  warmup = int(warmup_fraction * total_steps)
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    warm = step / max(warmup, 1)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    lr = base_lr * jnp.where(step < warmup, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return jnp.where(lr <= 0, floor, lr)

  return schedule


def bert_warmup_cosine(base_lr: float, total_steps: float, warmup_fraction: float) -> Schedule:
  """CLIP4Clip's BertAdam 'warmup_cosine': x = count / total (0-based, so the first update has lr 0);
  lr * x/w for x < w, else lr * 0.5 (1 + cos(pi x)) on the *whole-run* progress x. `total_steps` is BertAdam's
  t_total, which may be fractional."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")

  def schedule(count):
    x = jnp.asarray(count, jnp.float32) / total_steps
    w = max(warmup_fraction, 1e-12)
    return base_lr * jnp.where(x < warmup_fraction, x / w, 0.5 * (1.0 + jnp.cos(jnp.pi * x)))

  return schedule


def make_schedule(name: str, base_lr: float, total_steps: float, warmup_fraction: float = 0.0,
                  floor: float = 1e-8) -> Schedule:
  if name == "warmup_cosine":
    if total_steps != int(total_steps):
      raise ValueError(f"schedule 'warmup_cosine' counts whole updates; got {total_steps} steps")
    return warmup_cosine(base_lr, int(total_steps), warmup_fraction, floor)
  if name == "bert_warmup_cosine":
    return bert_warmup_cosine(base_lr, total_steps, warmup_fraction)
  if name == "constant":
    return lambda count: jnp.full((), base_lr, jnp.float32)
  raise ValueError(f"unknown schedule {name!r}; known: {SCHEDULES}")


# ------------------------------------------------------------------------------------------------ per-parameter


@dataclasses.dataclass(frozen=True)
class ParamRule:
  """What the optimiser does to one parameter (a pytree leaf: not traversed by jax.tree.map)."""
  name: str
  lr_multiplier: float = 1.0
  decay: bool = True
  frozen: bool = False
  clamp: tuple[float | None, float | None] | None = None  # (min, max) applied in place, see clamp_when
  clamp_when: str = "before_update"
  clip_unit: str = ""  # the original tensor this parameter belongs to (BertAdam's per-tensor clip); "" = name


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern]:
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"optim.{what}: {p!r} is not a regular expression ({e})") from None
  return out


def _bound(x) -> float | None:
  return None if x is None else float(x)


def param_rules(params: Any, *, no_decay: Sequence[str] = DEFAULT_NO_DECAY,
                lr_multipliers: Sequence[tuple[str, float]] = (), frozen: Sequence[str] = (),
                clamp: Sequence[tuple[str, float | None, float | None]] = (), clamp_when: str = "before_update",
                clip_units: Sequence[tuple[str, str]] = ()) -> Any:
  """A tree shaped like `params` with one ParamRule per leaf. A pattern that matches no parameter is an error
  (a typo would otherwise silently train what was meant to be frozen)."""
  if clamp_when not in CLAMP_WHEN:
    raise ValueError(f"optim.clamp_when = {clamp_when!r}; known: {CLAMP_WHEN}")
  no_decay_re = _compile(no_decay, "no_decay")
  frozen_re = _compile(frozen, "frozen")
  mult_re = [(p, float(m)) for p, (_, m) in zip(_compile([p for p, _ in lr_multipliers], "lr_multipliers"),
                                                lr_multipliers)]
  clamp_re = [(p, (_bound(lo), _bound(hi))) for p, (_, lo, hi) in zip(_compile([c[0] for c in clamp], "clamp"),
                                                                        clamp)]
  unit_re = [(p, r) for p, (_, r) in zip(_compile([u[0] for u in clip_units], "per_tensor_clip_units"), clip_units)]
  names = flat_names(params)
  for pattern in [*frozen_re, *[p for p, _ in mult_re], *[p for p, _ in clamp_re]]:
    if not any(pattern.search(n) for n in names):
      raise ValueError(f"optimiser pattern {pattern.pattern!r} matches no parameter (names look like {names[0]!r})")

  def rule(path, _):
    name = path_name(path)
    mult = next((m for p, m in mult_re if p.search(name)), 1.0)
    bounds = next((b for p, b in clamp_re if p.search(name)), None)
    unit = name
    for p, r in unit_re:
      unit = p.sub(r, unit)
    return ParamRule(name=name, lr_multiplier=mult, decay=not any(p.search(name) for p in no_decay_re),
                     frozen=any(p.search(name) for p in frozen_re), clamp=bounds, clamp_when=clamp_when,
                     clip_unit=unit)

  return jax.tree_util.tree_map_with_path(rule, params)


def clamp_params(params: Any, rules: Any, when: str) -> Any:
  """`params` with the clamps of `rules` that act at `when` ("before_update" | "after_update") applied."""
  if when not in CLAMP_WHEN:
    raise ValueError(f"clamp time {when!r}; known: {CLAMP_WHEN}")

  def one(rule, x):
    if rule.clamp is None or rule.clamp_when != when or rule.frozen:
      return x
    lo, hi = rule.clamp
    return jnp.clip(x, lo, hi).astype(x.dtype)

  return jax.tree.map(one, rules, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_ over all gradients: g * min(1, max_norm / (norm + 1e-6))."""
  def update(grads, state, params=None):
    del params
    norm = optax.global_norm(grads)
    coef = jnp.minimum(1.0, max_norm / (norm + CLIP_NORM_EPS))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_per_tensor(grads: Any, rules: Any, max_norm: float) -> Any:
  """BertAdam's per-tensor clip_grad_norm_(p, max_norm): every clip unit (an original tensor, see ParamRule)
  scaled by min(1, max_norm / (its norm + 1e-6)). Frozen parameters have no gradient and are skipped."""
  leaves, treedef = jax.tree.flatten(grads)
  rule_leaves = treedef.flatten_up_to(rules)
  sums: dict[str, Any] = {}
  for rule, g in zip(rule_leaves, leaves):
    if not rule.frozen:
      sq = jnp.sum(jnp.square(g.astype(jnp.float32)))
      sums[rule.clip_unit] = sq if rule.clip_unit not in sums else sums[rule.clip_unit] + sq
  coefs = {u: jnp.minimum(1.0, max_norm / (jnp.sqrt(sq) + CLIP_NORM_EPS)) for u, sq in sums.items()}
  out = [g if rule.frozen else (g * coefs[rule.clip_unit]).astype(g.dtype) for rule, g in zip(rule_leaves, leaves)]
  return treedef.unflatten(out)


def frozen_mask(rules: Any) -> Any:
  return jax.tree.map(lambda r: r.frozen, rules)


# ------------------------------------------------------------------------------------------------ the optimiser


class ReferenceAdamState(NamedTuple):
  count: jax.Array  # updates applied so far
  mu: Any  # first moments; optax.MaskedNode() for frozen parameters (no state)
  nu: Any  # second moments


def reference_adam(schedule: Schedule, rules: Any, *, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6,
                   weight_decay: float = 0.0, variant: str = "adamw",
                   per_tensor_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """The per-parameter Adam of the module docstring as an optax transformation (updates = new_p - p).
  `per_tensor_clip_norm` > 0 clips each clip unit's gradient first (BertAdam's max_grad_norm)."""
  if variant not in OPTIMIZERS:
    raise ValueError(f"unknown optimiser {variant!r}; known: {OPTIMIZERS}")

  def init(params):
    def moment(rule, p):
      return optax.MaskedNode() if rule.frozen else jnp.zeros_like(p)
    mu = jax.tree.map(moment, rules, params)
    nu = jax.tree.map(moment, rules, params)
    return ReferenceAdamState(count=jnp.zeros((), jnp.int32), mu=mu, nu=nu)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("reference_adam needs params (decoupled weight decay)")
    if per_tensor_clip_norm > 0:
      grads = clip_per_tensor(grads, rules, per_tensor_clip_norm)
    count = state.count + 1
    lr = schedule(state.count)
    t = count.astype(jnp.float32)
    if variant == "adamw":
      step_size = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    else:
      step_size = jnp.ones((), jnp.float32)

    def one(rule, g, p, m, v):
      if rule.frozen:
        return jnp.zeros_like(p), m, v
      m = b1 * m + (1.0 - b1) * g
      v = b2 * v + (1.0 - b2) * jnp.square(g)
      adam = m / (jnp.sqrt(v) + eps)
      lr_p = lr * rule.lr_multiplier
      wd = weight_decay if rule.decay else 0.0
      if variant == "adamw":
        stepped = p - lr_p * step_size * adam
        new_p = stepped - lr_p * wd * stepped
      else:
        new_p = p - lr_p * (adam + wd * p)
      return new_p - p, m, v

    out = jax.tree.map(one, rules, grads, params, state.mu, state.nu)
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and not isinstance(x, optax.MaskedNode)
    updates = jax.tree.map(lambda o: o[0], out, is_leaf=is_triple)
    mu = jax.tree.map(lambda o: o[1], out, is_leaf=is_triple)
    nu = jax.tree.map(lambda o: o[2], out, is_leaf=is_triple)
    return updates, ReferenceAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def apply_updates(params: Any, updates: Any) -> Any:
  """p + u in float32. For "adamw" the update already holds the after-step decay, so this equals the original's
  two in-place operations up to float32 rounding."""
  return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)


def make_optimizer(optim_cfg: Any, params: Any, total_steps: int) -> tuple[optax.GradientTransformation, Schedule,
                                                                          Any]:
  """(transformation, schedule, per-parameter rules) from the config's `optim` section:

    name ("adamw" | "bert_adam"), lr, b1, b2, eps, weight_decay, grad_clip_norm (<= 0: off),
    schedule ("warmup_cosine" | "bert_warmup_cosine" | "constant"), warmup_fraction, lr_floor,
    schedule_steps (0: `total_steps`), no_decay, lr_multipliers, frozen, clamp, clamp_when,
    per_tensor_clip_norm (<= 0: off), per_tensor_clip_units (see the module docstring).
  """
  get = optim_cfg.get if hasattr(optim_cfg, "get") else (lambda k, d=None: getattr(optim_cfg, k, d))
  schedule_steps = float(get("schedule_steps", 0) or 0) or total_steps
  schedule = make_schedule(get("schedule", "warmup_cosine"), float(get("lr")), schedule_steps,
                           float(get("warmup_fraction", 0.0)), float(get("lr_floor", 1e-8)))
  clamp = get("clamp", None)
  if clamp is None:  # the default applies where it matches (a model without logit_scale has nothing to clamp)
    names = flat_names(params)
    clamp = tuple(c for c in DEFAULT_CLAMP if any(re.search(c[0], n) for n in names))
  rules = param_rules(params, no_decay=tuple(get("no_decay", DEFAULT_NO_DECAY)),
                      lr_multipliers=tuple(tuple(x) for x in get("lr_multipliers", ())),
                      frozen=tuple(get("frozen", ())),
                      clamp=tuple(tuple(x) for x in clamp),
                      clamp_when=get("clamp_when", None) or "before_update",
                      clip_units=tuple(tuple(x) for x in get("per_tensor_clip_units", ())))
  adam = reference_adam(schedule, rules, b1=float(get("b1", 0.9)), b2=float(get("b2", 0.98)),
                        eps=float(get("eps", 1e-6)), weight_decay=float(get("weight_decay", 0.0)),
                        variant=get("name", "adamw"),
                        per_tensor_clip_norm=float(get("per_tensor_clip_norm", 0.0) or 0.0))
  clip = float(get("grad_clip_norm", 0.0) or 0.0)
  tx = optax.chain(clip_by_global_norm(clip), adam) if clip > 0 else adam
  return tx, schedule, rules


def describe_rules(rules: Any) -> list[str]:
  """Log lines: which parameters are frozen, undecayed or have a scaled lr."""
  leaves = jax.tree.leaves(rules)
  frozen = [r.name for r in leaves if r.frozen]
  no_decay = [r.name for r in leaves if not r.decay and not r.frozen]
  scaled = sorted({(r.lr_multiplier, r.name) for r in leaves if r.lr_multiplier != 1.0 and not r.frozen})
  lines = [f"{len(leaves)} parameters: {len(frozen)} frozen, {len(no_decay)} without weight decay, "
           f"{len(scaled)} with an lr multiplier"]
  lines += [f"  frozen: {n}" for n in frozen]
  lines += [f"  clamped to {r.clamp} {r.clamp_when.replace('_', ' ')}: {r.name}" for r in leaves
            if r.clamp is not None and not r.frozen]
  multipliers = sorted({m for m, _ in scaled})
  for m in multipliers:
    lines.append(f"  lr x {m:g}: {sum(1 for mm, _ in scaled if mm == m)} parameters")
  return lines
