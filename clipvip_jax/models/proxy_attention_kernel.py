"""A Pallas TPU kernel for CLIP-ViP's proxy-guided attention, whole clips on chip (attention="pallas").

Token layout (models/proxy_attention.py): [M proxies | frame 0's L patches | ... | frame T-1's], S = M + T*L.
Proxy queries see every key (minus padded frames' patches); frame t's patch queries see the proxies and frame t.
One grid step takes one clip and one head (several for short sequences: `heads_per_step`): its q, k, v
[head_dim, S] come into on-chip memory once, every frame group and the proxies' rows are computed there, and the
output leaves once. No score, no frame-group copy of the keys and no slice of the token sequence goes through
HBM: XLA's program for the same attention writes and re-reads float32 [B*T, heads, L, M+L] scores about ten times
per layer and copies q, k, v between the token layout and the frame groups' (docs/performance.md section 4).
Plain attention (no proxies) is left to XLA: layers.dot_product_attention says why.

Head-major, tokens in lanes: the kernel reads q, k, v as [B, heads, head_dim, S]. That is the layout the TPU
compiler gives the q, k, v projections' outputs ([B, S, heads, head_dim] with S minor-most), so the transposes
around the kernel are free (a token-major kernel, [B, S, heads * head_dim], made XLA copy q, k, v and the output
between the two layouts: ~15% of a layer's HBM bytes). A head is then 64 aligned sublanes: its products contract
over exactly head_dim, and a frame is a lane window of the clip (unaligned: offset M + t*L).

The backward pass recomputes each softmax from q and k (its max and sum too: nothing but q, k, v and the output
gradient is read), accumulates dk and dv of the proxies over the clip's frames in float32 on chip, and writes dq,
dk, dv once. Numerics follow jax.nn.dot_product_attention's XLA path: float32 logits scaled after the product,
softmax in float32 (max-subtracted, divided by the sum), probabilities cast to the value dtype before the product
with v; softmax's backward (ds = p * (dp - sum(p * dp))) in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array
TN = (((0,), (0,)), ((), ()))  # a.T @ b: [H, X] x [H, Y] -> [X, Y]
NT = (((1,), (1,)), ((), ()))  # a @ b.T: [H, Y] x [X, Y] -> [H, X]
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # what jax.nn.dot_product_attention puts at masked logits

# What the kernel may hold on chip: v4's TensorCore has 16 MiB of VMEM (v5e, v5p and v6e more), the limit every
# chip is asked for; the budget leaves Mosaic slack for its own temporaries.
VMEM_LIMIT = 16 * 1024 * 1024
VMEM_BUDGET = 13 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Layout:
  """The token layout of one clip."""
  proxies: int  # M
  frames: int  # T
  patches: int  # L
  head_dim: int

  @property
  def seq(self) -> int:
    return self.proxies + self.frames * self.patches

  def frame_lanes(self, t: int) -> slice:
    start = self.proxies + t * self.patches
    return slice(start, start + self.patches)


def vmem_bytes(layout: Layout, itemsize: int, heads: int = 1) -> int:
  """On-chip bytes of the backward pass (the larger) with `heads` heads per grid step: q, k, v, do in and dq, dk,
  dv out, each [heads, head_dim, S] and double-buffered by the pipeline, three float32 accumulators of one head,
  and a few float32 copies of the largest scores (a frame group's [L, M+L] or the proxies' [M, S])."""
  block = layout.seq * layout.head_dim
  scores = max(layout.patches * (layout.patches + layout.proxies), layout.proxies * layout.seq)
  return 2 * 7 * heads * block * itemsize + 3 * block * 4 + 4 * scores * 4


# Heads per grid step: enough that a step moves at least ~64K elements per array (a short sequence, such as a
# B/32 frame's 50 tokens, would otherwise pay the ~0.35 us per-step overhead thousands of times per layer).
STEP_ELEMENTS = 64 * 1024


def heads_per_step(layout: Layout, heads: int, itemsize: int) -> int:
  """The most heads (a divisor of `heads`) one grid step takes within STEP_ELEMENTS and the VMEM budget (>= 1)."""
  per_head = layout.head_dim * layout.seq
  fitting = [d for d in range(1, heads + 1) if heads % d == 0 and d * per_head <= STEP_ELEMENTS
             and vmem_bytes(layout, itemsize, d) <= VMEM_BUDGET]
  return max(fitting, default=1)


def fits(*, seq: int, head_dim: int, num_proxies: int, num_frames: int, itemsize: int) -> bool:
  """Whether the kernel takes this attention: proxies and a sequence made of equal frames, and one clip's head
  that fits on chip. Callers keep XLA's attention otherwise (a very long clip)."""
  patches, rest = divmod(seq - num_proxies, num_frames)
  if num_proxies < 1 or rest or patches < 1:
    return False
  return vmem_bytes(Layout(num_proxies, num_frames, patches, head_dim), itemsize) <= VMEM_BUDGET


def _scores(q: Array, k: Array, scale: float) -> Array:
  return jax.lax.dot_general(q, k, TN, preferred_element_type=jnp.float32) * scale


def _softmax(*parts: Array) -> list[Array]:
  """Softmax over the concatenation of `parts` along their last axis, returned in parts (float32)."""
  m = functools.reduce(jnp.maximum, [jnp.max(p, axis=1, keepdims=True) for p in parts])
  e = [jnp.exp(p - m) for p in parts]
  total = functools.reduce(jnp.add, [jnp.sum(x, axis=1, keepdims=True) for x in e])
  return [x / total for x in e]


def _softmax_backward(p: list[Array], dp: list[Array], scale: float) -> list[Array]:
  row = functools.reduce(jnp.add, [jnp.sum(a * b, axis=1, keepdims=True) for a, b in zip(p, dp)])
  return [a * (b - row) * scale for a, b in zip(p, dp)]


def _weighted(x: Array, p: Array) -> Array:
  """x [H, K] weighted by p [Q, K] (rows of probabilities or score gradients) -> [H, Q] float32."""
  return jax.lax.dot_general(x, p.astype(x.dtype), NT, preferred_element_type=jnp.float32)


def _proxy_scores(q: Array, k: Array, valid_ref, scale: float) -> Array:
  s = _scores(q, k, scale)
  if valid_ref is not None:  # [1, 1, S] float32, 1 = a key the proxies may see
    s = jnp.where(valid_ref[0] > 0, s, MASKED)
  return s


def _forward_kernel(*refs, layout: Layout, masked: bool):
  valid_ref, (q_ref, k_ref, v_ref, o_ref) = (refs[0], refs[1:]) if masked else (None, refs)
  lay, m = layout, layout.proxies
  scale = lay.head_dim**-0.5
  for j in range(q_ref.shape[1]):  # the step's heads
    kp, vp = k_ref[0, j, :, :m], v_ref[0, j, :, :m]
    for t in range(lay.frames):
      lanes = lay.frame_lanes(t)
      q, k, v = (r[0, j, :, lanes] for r in (q_ref, k_ref, v_ref))
      p = _softmax(_scores(q, k, scale), _scores(q, kp, scale))
      o_ref[0, j, :, lanes] = (_weighted(v, p[0]) + _weighted(vp, p[1])).astype(o_ref.dtype)
    # The proxies' rows: every key of the clip (padded frames' patches masked).
    (p,) = _softmax(_proxy_scores(q_ref[0, j, :, :m], k_ref[0, j], valid_ref, scale))
    o_ref[0, j, :, :m] = _weighted(v_ref[0, j], p).astype(o_ref.dtype)


def _backward_kernel(*refs, layout: Layout, masked: bool):
  valid_ref, refs = (refs[0], refs[1:]) if masked else (None, refs)
  q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, dq, dk, dv = refs
  lay, m = layout, layout.proxies
  scale = lay.head_dim**-0.5
  dt = q_ref.dtype
  for j in range(q_ref.shape[1]):  # the step's heads, one at a time through the float32 accumulators
    # The proxies' rows against every key first: their dk, dv reach every token.
    q, do = q_ref[0, j, :, :m], do_ref[0, j, :, :m]
    k, v = k_ref[0, j], v_ref[0, j]
    (p,) = _softmax(_proxy_scores(q, k, valid_ref, scale))
    dp = jax.lax.dot_general(do, v, TN, preferred_element_type=jnp.float32)
    (ds,) = _softmax_backward([p], [dp], scale)
    dq[:, :m] = _weighted(k, ds)
    dk[...] = jax.lax.dot(q, ds.astype(dt), preferred_element_type=jnp.float32)
    dv[...] = jax.lax.dot(do, p.astype(dt), preferred_element_type=jnp.float32)
    kp, vp = k_ref[0, j, :, :m], v_ref[0, j, :, :m]
    for t in range(lay.frames):
      lanes = lay.frame_lanes(t)
      q, k, v, do = (r[0, j, :, lanes] for r in (q_ref, k_ref, v_ref, do_ref))
      p = _softmax(_scores(q, k, scale), _scores(q, kp, scale))
      dp = [jax.lax.dot_general(do, x, TN, preferred_element_type=jnp.float32) for x in (v, vp)]
      ds = _softmax_backward(p, dp, scale)
      dq[:, lanes] = _weighted(k, ds[0]) + _weighted(kp, ds[1])
      dk[:, lanes] += jax.lax.dot(q, ds[0].astype(dt), preferred_element_type=jnp.float32)
      dv[:, lanes] += jax.lax.dot(do, p[0].astype(dt), preferred_element_type=jnp.float32)
      dk[:, :m] += jax.lax.dot(q, ds[1].astype(dt), preferred_element_type=jnp.float32)
      dv[:, :m] += jax.lax.dot(do, p[1].astype(dt), preferred_element_type=jnp.float32)
    dq_ref[0, j] = dq[...].astype(dq_ref.dtype)
    dk_ref[0, j] = dk[...].astype(dk_ref.dtype)
    dv_ref[0, j] = dv[...].astype(dv_ref.dtype)


def _cost(layout: Layout, heads: int, products: int, nbytes: int):
  """What a kernel does, for XLA's cost analysis (it cannot look inside a kernel, and the planner's step-time
  estimate takes the kernel's time from this): `products` score-shaped matmuls per head over head_dim, one exp
  per score, each operand read and each result written once. `heads`: clips x heads."""
  from jax.experimental import pallas as pl
  lay = layout
  scores = lay.frames * lay.patches * (lay.patches + lay.proxies) + lay.proxies * lay.seq
  return pl.CostEstimate(flops=products * 2 * scores * lay.head_dim * heads, transcendentals=scores * heads,
                         bytes_accessed=nbytes)


def _nbytes(*arrays) -> int:
  return sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays)


def _call(layout: Layout, q, k, v, valid, do=None):
  """The forward (do None: returns the output) or backward (returns dq, dk, dv) pallas_call for one device's
  clips: q, k, v (and do) [B, heads, head_dim, S]; valid [B, 1, S] float32 (1 = a key the proxies may see) or
  None."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  b, n, h, s = q.shape
  per_step = heads_per_step(layout, n, jnp.dtype(q.dtype).itemsize)
  head = pl.BlockSpec((1, per_step, h, s), lambda i, j: (i, j, 0, 0))
  arrays = [q, k, v] if do is None else [q, k, v, do]
  specs = [head] * len(arrays)
  if valid is not None:
    arrays, specs = [valid, *arrays], [pl.BlockSpec((1, 1, s), lambda i, j: (i, 0, 0)), *specs]
  kw = dict(grid=(b, n // per_step), in_specs=specs,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                                 vmem_limit_bytes=VMEM_LIMIT))
  kernel_kw = dict(layout=layout, masked=valid is not None)
  if do is None:
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        functools.partial(_forward_kernel, **kernel_kw), out_shape=out, out_specs=head,
        name="proxy_attention_fwd", cost_estimate=_cost(layout, b * n, 2, _nbytes(*arrays, out)), **kw)(*arrays)
  outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  return pl.pallas_call(
      functools.partial(_backward_kernel, **kernel_kw), out_shape=outs, out_specs=[head] * 3,
      scratch_shapes=[pltpu.VMEM((h, s), jnp.float32)] * 3, name="proxy_attention_bwd",
      cost_estimate=_cost(layout, b * n, 5, _nbytes(*arrays, *outs)), **kw)(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(layout: Layout, q: Array, k: Array, v: Array, valid: Array | None) -> Array:
  return _call(layout, q, k, v, valid)


def _attention_fwd(layout, q, k, v, valid):
  return _call(layout, q, k, v, valid), (q, k, v, valid)


def _attention_bwd(layout, res, do):
  q, k, v, valid = res
  dq, dk, dv = _call(layout, q, k, v, valid, do.astype(q.dtype))
  return dq, dk, dv, None if valid is None else jnp.zeros_like(valid)


_attention.defvjp(_attention_fwd, _attention_bwd)


def proxy_attention(q: Array, k: Array, v: Array, *, num_proxies: int, num_frames: int,
                    key_valid: Array | None = None) -> Array:
  """CLIP-ViP's proxy-guided attention on one device's clips: q, k, v [B, S, heads, head_dim] with
  S = num_proxies + num_frames * L; key_valid [B, S] (True: a key the proxies' queries may see; None: all).
  Returns [B, S, heads, head_dim] in q's dtype."""
  b, s, n, h = q.shape
  patches, rest = divmod(s - num_proxies, num_frames)
  if num_proxies < 1 or rest or patches < 1:
    raise ValueError(f"sequence of {s} tokens is not {num_proxies} proxies + {num_frames} frames of equal size "
                     "(the kernel needs at least one proxy)")
  layout = Layout(num_proxies, num_frames, patches, h)
  head_major = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # noqa: E731  [B, N, H, S]: free in XLA's TPU layout
  valid = None if key_valid is None else key_valid.astype(jnp.float32).reshape(b, 1, s)
  out = _attention(layout, head_major(q), head_major(k), head_major(v), valid)
  return jnp.transpose(out, (0, 3, 1, 2))
