"""A Pallas TPU kernel for CLIP-ViP's proxy-guided attention, whole clips at a time (attention="pallas").

Token layout (models/proxy_attention.py): [M proxies | frame 0's L patches | ... | frame T-1's], S = M + T*L.
Proxy queries see every key (minus padded frames' patches); frame t's patch queries see the proxies and frame t.
One grid step takes one clip and one 128-lane chunk of heads: q, k, v [S, 128] come into on-chip memory once, every
frame group and the proxies' rows are computed there, and the clip's output [S, 128] leaves once. No score, no
frame-group copy of the keys and no slice of the token sequence goes through HBM: XLA's program for the same
attention writes and re-reads float32 [B*T, heads, L, M+L] scores about ten times per layer and copies q, k, v
between the token layout and the frame groups' (docs/performance.md section 4). Plain attention (CLIP's image
tower) is the case M = 0, T = 1.

The backward pass recomputes each softmax from q and k (its max and sum too: nothing but q, k, v and the output
gradient is read), accumulates dk and dv of the proxies over the clip's frames in float32 on chip, and writes dq,
dk, dv once.

Heads share a 128-lane chunk (two heads of 64 in B/16 and B/32): a head's products use the chunk with the other
heads' lanes zeroed, so every load and store is lane-aligned and the MXU (128 wide) makes the same passes as for
64 lanes. Numerics follow jax.nn.dot_product_attention's XLA path: float32 logits scaled after the product, softmax
in float32 (max-subtracted, divided by the sum), probabilities cast to the value dtype before the product with v;
softmax's backward (ds = p * (dp - sum(p * dp))) in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array
LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # what jax.nn.dot_product_attention puts at masked logits


@dataclasses.dataclass(frozen=True)
class Layout:
  """The token layout of one clip and how heads sit in lanes."""
  proxies: int  # M
  frames: int  # T
  patches: int  # L
  heads: int
  head_dim: int

  @property
  def width(self) -> int:
    """Lanes per grid step: 128 (several heads) when head_dim divides it, head_dim when it is a multiple of 128,
    the whole width when narrower than 128 (the tests' tiny models)."""
    dim = self.heads * self.head_dim
    width = min(dim, LANES) if self.head_dim <= LANES else self.head_dim
    if width % self.head_dim or dim % width or (dim >= LANES and width % LANES):
      raise ValueError(f"attention='pallas' needs head_dim ({self.head_dim}) dividing 128 or a multiple of 128, "
                       f"and a width ({dim}) made of such chunks")
    return width

  @property
  def seq(self) -> int:
    return self.proxies + self.frames * self.patches

  def frame_rows(self, t: int) -> slice:
    start = self.proxies + t * self.patches
    return slice(start, start + self.patches)


# What the kernel may hold on chip: v4's TensorCore has 16 MiB of VMEM (v5e, v5p and v6e more), the limit every
# chip is asked for; the budget leaves Mosaic slack for its own temporaries (vmem_bytes was within 4% of the
# compiler's count at 24 frames of 196 patches).
VMEM_LIMIT = 16 * 1024 * 1024
VMEM_BUDGET = 29 * 512 * 1024  # 14.5 MiB


def vmem_bytes(layout: Layout, itemsize: int) -> int:
  """On-chip bytes of the backward pass (the larger): q, k, v, do in and dq, dk, dv out, each [S, width] and
  double-buffered by the pipeline, three float32 accumulators, and a few float32 copies of the largest scores
  (a frame group's [L, M+L] or the proxies' [M, S] or, for plain attention, [S, S])."""
  block = layout.seq * layout.width
  scores = max(layout.patches * (layout.patches + layout.proxies), layout.proxies * layout.seq)
  return 2 * 7 * block * itemsize + 3 * block * 4 + 4 * scores * 4


def fits(*, seq: int, heads: int, head_dim: int, num_proxies: int, num_frames: int, itemsize: int) -> bool:
  """Whether the kernel takes this attention: shapes it can lay out and a clip that fits on chip. Callers keep
  XLA's attention otherwise (a very long clip, an odd head_dim)."""
  patches, rest = divmod(seq - num_proxies, num_frames)
  layout = Layout(num_proxies, num_frames, patches, heads, head_dim)
  try:
    layout.width
  except ValueError:
    return False
  return not rest and patches >= 1 and vmem_bytes(layout, itemsize) <= VMEM_BUDGET


def _head_lanes(width: int, head_dim: int, j: int) -> Array:
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return (lane >= j * head_dim) & (lane < (j + 1) * head_dim)


def _only(x: Array, sel: Array) -> Array:
  return jnp.where(sel, x, jnp.zeros_like(x))


def _scores(q: Array, k: Array, scale: float) -> Array:
  return jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale


def _softmax(*parts: Array) -> list[Array]:
  """Softmax over the concatenation of `parts` along their last axis, returned in parts (float32)."""
  m = functools.reduce(jnp.maximum, [jnp.max(p, axis=1, keepdims=True) for p in parts])
  e = [jnp.exp(p - m) for p in parts]
  total = functools.reduce(jnp.add, [jnp.sum(x, axis=1, keepdims=True) for x in e])
  return [x / total for x in e]


def _softmax_backward(p: list[Array], dp: list[Array], scale: float) -> list[Array]:
  row = functools.reduce(jnp.add, [jnp.sum(a * b, axis=1, keepdims=True) for a, b in zip(p, dp)])
  return [a * (b - row) * scale for a, b in zip(p, dp)]


def _valid_keys(valid_ref) -> Array | None:
  return None if valid_ref is None else valid_ref[0] > 0  # [1, S]


def _forward_kernel(*refs, layout: Layout, masked: bool):
  if masked:
    valid_ref, q_ref, k_ref, v_ref, o_ref, acc = refs
  else:
    q_ref, k_ref, v_ref, o_ref, acc = refs
    valid_ref = None
  lay, width = layout, layout.width
  scale, m = lay.head_dim**-0.5, lay.proxies
  dt = v_ref.dtype
  for j in range(width // lay.head_dim):
    sel = _head_lanes(width, lay.head_dim, j)
    kp, vp = _only(k_ref[0, :m], sel), _only(v_ref[0, :m], sel)
    for t in range(lay.frames):
      rows = lay.frame_rows(t)
      q = _only(q_ref[0, rows], sel)
      parts = [_scores(q, k_ref[0, rows], scale)] + ([_scores(q, kp, scale)] if m else [])
      p = _softmax(*parts)
      o = jax.lax.dot(p[0].astype(dt), _only(v_ref[0, rows], sel), preferred_element_type=jnp.float32)
      if m:
        o = o + jax.lax.dot(p[1].astype(dt), vp, preferred_element_type=jnp.float32)
      acc[rows] = o if j == 0 else acc[rows] + o
    if m:  # the proxies' rows: every key of the clip (padded frames' patches masked)
      s = _scores(_only(q_ref[0, :m], sel), k_ref[0], scale)
      valid = _valid_keys(valid_ref)
      if valid is not None:
        s = jnp.where(valid, s, MASKED)
      (p,) = _softmax(s)
      o = jax.lax.dot(p.astype(dt), _only(v_ref[0], sel), preferred_element_type=jnp.float32)
      acc[:m] = o if j == 0 else acc[:m] + o
  o_ref[0] = acc[...].astype(o_ref.dtype)


def _backward_kernel(*refs, layout: Layout, masked: bool):
  if masked:
    valid_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, dq, dk, dv = refs
  else:
    q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, dq, dk, dv = refs
    valid_ref = None
  lay, width = layout, layout.width
  scale, m = lay.head_dim**-0.5, lay.proxies
  dt = q_ref.dtype
  dq[...] = jnp.zeros(dq.shape, jnp.float32)
  dk[...] = jnp.zeros(dk.shape, jnp.float32)
  dv[...] = jnp.zeros(dv.shape, jnp.float32)
  for j in range(width // lay.head_dim):
    sel = _head_lanes(width, lay.head_dim, j)
    if m:
      kp, vp = k_ref[0, :m], v_ref[0, :m]
      kpj = _only(kp, sel)
    for t in range(lay.frames):
      rows = lay.frame_rows(t)
      q, k, do = (_only(r[0, rows], sel) for r in (q_ref, k_ref, do_ref))
      k_all = k_ref[0, rows]
      parts = [_scores(q, k_all, scale)] + ([_scores(q, kp, scale)] if m else [])
      p = _softmax(*parts)
      dp = [jax.lax.dot_general(do, v_ref[0, rows], NT, preferred_element_type=jnp.float32)]
      if m:
        dp.append(jax.lax.dot_general(do, vp, NT, preferred_element_type=jnp.float32))
      ds = [x.astype(dt) for x in _softmax_backward(p, dp, scale)]
      dq_t = jax.lax.dot(ds[0], k, preferred_element_type=jnp.float32)
      dk[rows] += jax.lax.dot_general(ds[0], q, TN, preferred_element_type=jnp.float32)
      dv[rows] += jax.lax.dot_general(p[0].astype(dt), do, TN, preferred_element_type=jnp.float32)
      if m:
        dq_t = dq_t + jax.lax.dot(ds[1], kpj, preferred_element_type=jnp.float32)
        dk[:m] += jax.lax.dot_general(ds[1], q, TN, preferred_element_type=jnp.float32)
        dv[:m] += jax.lax.dot_general(p[1].astype(dt), do, TN, preferred_element_type=jnp.float32)
      dq[rows] += dq_t
    if m:  # the proxies' rows against every key
      q, do = _only(q_ref[0, :m], sel), _only(do_ref[0, :m], sel)
      s = _scores(q, k_ref[0], scale)
      valid = _valid_keys(valid_ref)
      if valid is not None:
        s = jnp.where(valid, s, MASKED)
      (p,) = _softmax(s)
      dp = jax.lax.dot_general(do, v_ref[0], NT, preferred_element_type=jnp.float32)
      (ds,) = _softmax_backward([p], [dp], scale)
      ds = ds.astype(dt)
      dq[:m] += jax.lax.dot(ds, _only(k_ref[0], sel), preferred_element_type=jnp.float32)
      dk[...] += jax.lax.dot_general(ds, q, TN, preferred_element_type=jnp.float32)
      dv[...] += jax.lax.dot_general(p.astype(dt), do, TN, preferred_element_type=jnp.float32)
  dq_ref[0] = dq[...].astype(dq_ref.dtype)
  dk_ref[0] = dk[...].astype(dk_ref.dtype)
  dv_ref[0] = dv[...].astype(dv_ref.dtype)


def _cost(layout: Layout, clips: int, products: int, nbytes: int):
  """What a kernel does, for XLA's cost analysis (it cannot look inside a kernel, and the planner's step-time
  estimate takes the kernel's time from this): `products` score-shaped matmuls per head, each over the whole
  lane chunk (the MXU's real work: twice a head's own lanes when two heads of 64 share 128), one exp per score,
  each operand read and each result written once."""
  from jax.experimental import pallas as pl
  lay = layout
  scores = lay.frames * lay.patches * (lay.patches + lay.proxies) + lay.proxies * lay.seq
  return pl.CostEstimate(flops=products * 2 * scores * lay.width * lay.heads * clips,
                         transcendentals=scores * lay.heads * clips, bytes_accessed=nbytes)


def _nbytes(*arrays) -> int:
  return sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays)


def _call(layout: Layout, q, k, v, valid, do=None):
  """The forward (do None: returns the output) or backward (returns dq, dk, dv) pallas_call for one device's
  clips: q, k, v (and do) [B, S, D]; valid [B, 1, S] float32 (1 = a key the proxies may see) or None."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  b, s, d = q.shape
  width = layout.width
  chunk = pl.BlockSpec((1, s, width), lambda i, c: (i, 0, c))
  arrays = [q, k, v] if do is None else [q, k, v, do]
  specs = [chunk] * len(arrays)
  if valid is not None:
    arrays, specs = [valid, *arrays], [pl.BlockSpec((1, 1, s), lambda i, c: (i, 0, 0)), *specs]
  kw = dict(grid=(b, d // width), in_specs=specs,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                                 vmem_limit_bytes=VMEM_LIMIT))
  kernel_kw = dict(layout=layout, masked=valid is not None)
  if do is None:
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        functools.partial(_forward_kernel, **kernel_kw), out_shape=out, out_specs=chunk,
        scratch_shapes=[pltpu.VMEM((s, width), jnp.float32)], name="proxy_attention_fwd",
        cost_estimate=_cost(layout, b, 2, _nbytes(*arrays, out)), **kw)(*arrays)
  outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  return pl.pallas_call(
      functools.partial(_backward_kernel, **kernel_kw), out_shape=outs, out_specs=[chunk] * 3,
      scratch_shapes=[pltpu.VMEM((s, width), jnp.float32)] * 3, name="proxy_attention_bwd",
      cost_estimate=_cost(layout, b, 5, _nbytes(*arrays, *outs)), **kw)(*arrays)


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
  num_proxies=0, num_frames=1 is plain unmasked attention. Returns [B, S, heads, head_dim] in q's dtype."""
  b, s, n, h = q.shape
  patches, rest = divmod(s - num_proxies, num_frames)
  if rest or patches < 1:
    raise ValueError(f"sequence of {s} tokens is not {num_proxies} proxies + {num_frames} frames of equal size")
  layout = Layout(num_proxies, num_frames, patches, n, h)
  lanes = lambda x: x.reshape(b, s, n * h)  # noqa: E731  (heads in lanes: a free reshape)
  valid = None if key_valid is None else key_valid.astype(jnp.float32).reshape(b, 1, s)
  return _attention(layout, lanes(q), lanes(k), lanes(v), valid).reshape(b, s, n, h)
