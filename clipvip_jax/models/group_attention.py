"""A Pallas TPU kernel for many short attentions: CLIP-ViP's frame groups (attention="pallas").

Each group g of G attends its L queries to [its prefix keys | its own L keys]: in CLIP-ViP a frame's 196 patch
queries see the clip's M=4 proxies and the frame's 196 patches. The whole group (all heads, every score) is one
grid step, so the scores [L, M+L] never leave on-chip memory: HBM sees q, k, v and the output once in the forward
pass, and q, k, v, the output gradient and one float32 number per query and head in the backward pass. XLA's own
program writes and re-reads float32 [G, heads, L, M+L] score arrays about ten times per layer (the largest term
of the step's HBM traffic: docs/performance.md section 4), and jax's general flash-attention kernel pads 196/200
to 256 and keeps 128-lane copies of its softmax statistics.

Layout: q, k, v [G, L, D] with D = heads * head_dim (heads in lanes, as the projections write them); the prefix
kp, vp [B, M, D] is shared by the G/B consecutive groups of one clip (read through the index map, never copied).
Heads are taken 128 lanes at a time (two heads of 64); a head's products use the chunk with the other head's lanes
zeroed, so every load and store is 128-lane aligned and the MXU (128 wide) does the same passes as for 64 lanes.

Numerics follow jax.nn.dot_product_attention's XLA path: float32 logits scaled after the product, softmax in
float32 (max-subtracted, divided by the sum), probabilities cast to the value dtype before the product with v; the
backward pass is softmax's (ds = p * (dp - sum(p * dp))) in float32, recomputing p from the saved log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def chunk_width(dim: int, head_dim: int) -> int:
  """Lanes per chunk: 128 (several heads) when head_dim divides it, else head_dim (a multiple of 128); the whole
  width when it is narrower than 128 (the tests' tiny models)."""
  width = min(dim, LANES) if head_dim <= LANES else head_dim
  if width % head_dim or dim % width or (dim >= LANES and width % LANES):
    raise ValueError(f"attention='pallas' needs head_dim ({head_dim}) dividing 128 or a multiple of 128, "
                     f"and a width ({dim}) made of such chunks")
  return width


def _head_lanes(width: int, head_dim: int, j: int) -> Array:
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return (lane >= j * head_dim) & (lane < (j + 1) * head_dim)


def _lse_lane(h: int) -> Array:
  return jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1) == h


def _forward_kernel(*refs, heads, head_dim, width, scale, prefix):
  if prefix:
    q_ref, kp_ref, k_ref, vp_ref, v_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  per_chunk = width // head_dim
  lse_all = jnp.zeros((q_ref.shape[1], LANES), jnp.float32)
  for c in range(heads // per_chunk):
    lanes = slice(c * width, (c + 1) * width)
    q, k, v = q_ref[0, :, lanes], k_ref[0, :, lanes], v_ref[0, :, lanes]
    out = jnp.zeros((q.shape[0], width), jnp.float32)
    for j in range(per_chunk):
      sel = _head_lanes(width, head_dim, j)
      qj = jnp.where(sel, q, jnp.zeros_like(q))
      s = jax.lax.dot_general(qj, k, NT, preferred_element_type=jnp.float32) * scale
      m = jnp.max(s, axis=1, keepdims=True)
      if prefix:
        kp, vp = kp_ref[0, :, lanes], vp_ref[0, :, lanes]
        sp = jax.lax.dot_general(qj, kp, NT, preferred_element_type=jnp.float32) * scale
        m = jnp.maximum(m, jnp.max(sp, axis=1, keepdims=True))
      e = jnp.exp(s - m)
      total = jnp.sum(e, axis=1, keepdims=True)
      if prefix:
        ep = jnp.exp(sp - m)
        total = total + jnp.sum(ep, axis=1, keepdims=True)
      o = jax.lax.dot((e / total).astype(v.dtype), v, preferred_element_type=jnp.float32)
      if prefix:
        o = o + jax.lax.dot((ep / total).astype(v.dtype), vp, preferred_element_type=jnp.float32)
      out = jnp.where(sel, o, out)
      lse_all = jnp.where(_lse_lane(c * per_chunk + j), m + jnp.log(total), lse_all)
    o_ref[0, :, lanes] = out.astype(o_ref.dtype)
  lse_ref[0] = lse_all


def _backward_kernel(*refs, heads, head_dim, width, scale, prefix):
  if prefix:
    (q_ref, kp_ref, k_ref, vp_ref, v_ref, lse_ref, do_ref,
     dq_ref, dkp_ref, dk_ref, dvp_ref, dv_ref) = refs
  else:
    q_ref, k_ref, v_ref, lse_ref, do_ref, dq_ref, dk_ref, dv_ref = refs
  per_chunk = width // head_dim
  lse_all = lse_ref[0]
  for c in range(heads // per_chunk):
    lanes = slice(c * width, (c + 1) * width)
    q, k, v, do = q_ref[0, :, lanes], k_ref[0, :, lanes], v_ref[0, :, lanes], do_ref[0, :, lanes]
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    if prefix:
      kp, vp = kp_ref[0, :, lanes], vp_ref[0, :, lanes]
      dkp = jnp.zeros(kp.shape, jnp.float32)
      dvp = jnp.zeros(vp.shape, jnp.float32)
    for j in range(per_chunk):
      sel = _head_lanes(width, head_dim, j)
      qj = jnp.where(sel, q, jnp.zeros_like(q))
      doj = jnp.where(sel, do, jnp.zeros_like(do))
      lse = jnp.sum(jnp.where(_lse_lane(c * per_chunk + j), lse_all, 0.0), axis=1, keepdims=True)
      p = jnp.exp(jax.lax.dot_general(qj, k, NT, preferred_element_type=jnp.float32) * scale - lse)
      dp = jax.lax.dot_general(doj, v, NT, preferred_element_type=jnp.float32)
      row = jnp.sum(p * dp, axis=1, keepdims=True)
      if prefix:
        pp = jnp.exp(jax.lax.dot_general(qj, kp, NT, preferred_element_type=jnp.float32) * scale - lse)
        dpp = jax.lax.dot_general(doj, vp, NT, preferred_element_type=jnp.float32)
        row = row + jnp.sum(pp * dpp, axis=1, keepdims=True)
      ds = (p * (dp - row) * scale).astype(q.dtype)
      kj = jnp.where(sel, k, jnp.zeros_like(k))
      dq = dq + jax.lax.dot(ds, kj, preferred_element_type=jnp.float32)
      dk = dk + jax.lax.dot_general(ds, qj, TN, preferred_element_type=jnp.float32)
      dv = dv + jax.lax.dot_general(p.astype(v.dtype), doj, TN, preferred_element_type=jnp.float32)
      if prefix:
        dsp = (pp * (dpp - row) * scale).astype(q.dtype)
        kpj = jnp.where(sel, kp, jnp.zeros_like(kp))
        dq = dq + jax.lax.dot(dsp, kpj, preferred_element_type=jnp.float32)
        dkp = dkp + jax.lax.dot_general(dsp, qj, TN, preferred_element_type=jnp.float32)
        dvp = dvp + jax.lax.dot_general(pp.astype(v.dtype), doj, TN, preferred_element_type=jnp.float32)
    dq_ref[0, :, lanes] = dq.astype(dq_ref.dtype)
    dk_ref[0, :, lanes] = dk.astype(dk_ref.dtype)
    dv_ref[0, :, lanes] = dv.astype(dv_ref.dtype)
    if prefix:
      dkp_ref[0, :, lanes] = dkp
      dvp_ref[0, :, lanes] = dvp


def _specs(g, l, d, lk, m, groups_per_prefix):
  from jax.experimental import pallas as pl
  own = pl.BlockSpec((1, l, d), lambda i: (i, 0, 0))
  own_k = pl.BlockSpec((1, lk, d), lambda i: (i, 0, 0))
  # lax.div, not //: floor division lowers through `sign`, which asks the local device for its TPU generation.
  shared = pl.BlockSpec((1, m, d), lambda i: (jax.lax.div(i, groups_per_prefix), 0, 0))
  per_group_prefix = pl.BlockSpec((1, m, d), lambda i: (i, 0, 0))
  lse = pl.BlockSpec((1, l, LANES), lambda i: (i, 0, 0))
  return own, own_k, shared, per_group_prefix, lse


def _cost(g, l, lk, m, head_dim, heads, products, nbytes):
  """What the kernel does, for XLA's cost analysis (it cannot look inside a kernel): `products` [L, M+L] x
  [M+L, head_dim] matmuls per head (counted as XLA counts its own: the head's lanes, not the zeroed ones of the
  128-lane chunk the MXU passes over), one exp per score, and each operand read and each result written once."""
  from jax.experimental import pallas as pl
  return pl.CostEstimate(flops=products * 2 * l * (lk + m) * head_dim * heads * g,
                         transcendentals=heads * g * l * (lk + m), bytes_accessed=nbytes)


def _nbytes(*arrays) -> int:
  return sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays)


def _call(q, k, v, kp, vp, *, heads, backward_args=None):
  """The forward (backward_args None: returns out, lse) or backward (backward_args (lse, do): returns the
  gradients) pallas_call for one device's groups."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  g, l, d = q.shape
  lk = k.shape[1]
  head_dim = d // heads
  width = chunk_width(d, head_dim)
  prefix = kp is not None
  m = kp.shape[1] if prefix else 0
  per_prefix = g // kp.shape[0] if prefix else 1
  own, own_k, shared, per_group_prefix, lse_spec = _specs(g, l, d, lk, m, per_prefix)
  kw = dict(heads=heads, head_dim=head_dim, width=width, scale=head_dim**-0.5, prefix=prefix)
  ins = [q, kp, k, vp, v] if prefix else [q, k, v]
  in_specs = [own, shared, own_k, shared, own_k] if prefix else [own, own_k, own_k]
  params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  if backward_args is None:
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((g, l, LANES), jnp.float32)]
    nbytes = _nbytes(*ins) + _nbytes(*out_shape)
    return pl.pallas_call(
        functools.partial(_forward_kernel, **kw), grid=(g,), in_specs=in_specs, out_specs=[own, lse_spec],
        out_shape=out_shape, compiler_params=params, name="group_attention_fwd",
        cost_estimate=_cost(g, l, lk, m, head_dim, heads, 2, nbytes))(*ins)
  lse, do = backward_args
  outs = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [own]
  if prefix:  # per-group float32 prefix gradients, summed over a clip's groups by the caller
    outs += [jax.ShapeDtypeStruct((g, m, d), jnp.float32)]
    out_specs += [per_group_prefix]
  outs += [jax.ShapeDtypeStruct(k.shape, k.dtype)]
  out_specs += [own_k]
  if prefix:
    outs += [jax.ShapeDtypeStruct((g, m, d), jnp.float32)]
    out_specs += [per_group_prefix]
  outs += [jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs += [own_k]
  nbytes = _nbytes(*ins, lse, do) + _nbytes(*outs)
  return pl.pallas_call(
      functools.partial(_backward_kernel, **kw), grid=(g,), in_specs=in_specs + [lse_spec, own], out_specs=out_specs,
      out_shape=outs, compiler_params=params, name="group_attention_bwd",
      cost_estimate=_cost(g, l, lk, m, head_dim, heads, 5, nbytes))(*ins, lse, do)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def group_attention(q: Array, k: Array, v: Array, kp: Array | None, vp: Array | None, heads: int) -> Array:
  """softmax(q [k_prefix | k]^T / sqrt(head_dim)) [v_prefix | v] per group and head, on one device's arrays.

  q [G, L, D], k and v [G, Lk, D]; kp and vp [B, M, D] (or both None: no prefix), G a multiple of B, group g using
  prefix g // (G/B). D = heads * head_dim, heads in lanes. Returns [G, L, D] in q's dtype.
  """
  return _call(q, k, v, kp, vp, heads=heads)[0]


def _group_attention_fwd(q, k, v, kp, vp, heads):
  out, lse = _call(q, k, v, kp, vp, heads=heads)
  return out, (q, k, v, kp, vp, lse)


def _group_attention_bwd(heads, res, do):
  q, k, v, kp, vp, lse = res
  grads = _call(q, k, v, kp, vp, heads=heads, backward_args=(lse, do.astype(q.dtype)))
  if kp is None:
    dq, dk, dv = grads
    return dq, dk, dv, None, None
  dq, dkp, dk, dvp, dv = grads
  b, m, d = kp.shape

  def per_prefix(x, like):  # [G, M, D] float32 per group -> [B, M, D]: the sum over a clip's groups
    return x.reshape(b, -1, m, d).sum(1).astype(like.dtype)

  return dq, dk, dv, per_prefix(dkp, kp), per_prefix(dvp, vp)


group_attention.defvjp(_group_attention_fwd, _group_attention_bwd)
