"""Transformer building blocks shared by every model in the project.

Parameters are float32 `nnx.Param`s annotated with logical axis names ("embed", "mlp", "heads", "kv", "vocab", ...);
`clipvip_jax.train.sharding` maps those names to mesh axes, so changing the parallelism is a config edit.
Computation runs in `dtype` (float32, or bfloat16 for training); LayerNorm statistics and softmax stay in float32.

Kernel layouts (what the converters produce):
  Dense.kernel            [in, out]
  MultiHeadAttention.query/key/value.kernel [embed, heads, kv], .bias [heads, kv]
  MultiHeadAttention.out.kernel             [heads, kv, embed], .bias [embed]
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
# (q, k, v) -> out, all [batch, seq, heads, head_dim]. Lets a model swap in its own attention pattern
# (CLIP-ViP's proxy-guided attention, masked temporal attention) without re-writing the block.
AttentionFn = Callable[[Array, Array, Array], Array]


def param(value: Array, names: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter carrying logical axis names; sharded later by the trainer, never eagerly."""
  return nnx.Param(value, sharding_names=tuple(names), eager_sharding=False)


def normal_init(rngs: nnx.Rngs, shape: Sequence[int], std: float) -> Array:
  return std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)


def quick_gelu(x: Array) -> Array:
  # CLIP's activation: x * sigmoid(1.702 x).
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# Weight gathering (FSDP). The trainer sets a function (kernel in the compute dtype, its logical names) -> the
# kernel constrained to its sharding WITHOUT the fsdp split, while the step is traced (`weight_gather`); every
# projection applies it to its kernel before the product. XLA then all-gathers each layer's weights (in the compute
# dtype: half the bytes of float32) just before they are used, again in the backward pass, and reduce-scatters their
# gradients to the shards: the FSDP pattern. Left to itself, the partitioner resharded activations instead
# (all-reduces and all-to-alls of activations, no all-gather: docs/performance.md section 4).
_WEIGHT_GATHER: contextvars.ContextVar[Callable[[Array, Sequence[str | None]], Array] | None] = \
    contextvars.ContextVar("weight_gather", default=None)


@contextlib.contextmanager
def weight_gather(fn: Callable[[Array, Sequence[str | None]], Array] | None) -> Iterator[None]:
  """Within the block, projections traced apply `fn(kernel, names)` to their kernel (None: nothing)."""
  token = _WEIGHT_GATHER.set(fn)
  try:
    yield
  finally:
    _WEIGHT_GATHER.reset(token)


# The three kernel layouts: (forward, input gradient, kernel gradient) einsums.
DENSE_EQS = ("...i,io->...o", "...o,io->...i", "...i,...o->io")
HEAD_IN_EQS = ("...d,dnh->...nh", "...nh,dnh->...d", "...d,...nh->dnh")
HEAD_OUT_EQS = ("...nh,nhd->...d", "...d,nhd->...nh", "...nh,...d->nhd")


@dataclasses.dataclass(frozen=True)
class Product:
  """A linear product and its two transposes, for `project`: forward(x, kernel) -> y, input_grad(g, kernel) -> dx,
  kernel_grad(x, g) -> dk with float32 accumulation AND output (the float32 gradient sum `project` promises)."""
  forward: Callable[[Array, Array], Array]
  input_grad: Callable[[Array, Array], Array]
  kernel_grad: Callable[[Array, Array], Array]


def einsum_product(eqs: tuple[str, str, str]) -> Product:
  forward_eq, input_eq, kernel_eq = eqs
  return Product(lambda x, w: jnp.einsum(forward_eq, x, w), lambda g, w: jnp.einsum(input_eq, g, w),
                 lambda x, g: jnp.einsum(kernel_eq, x, g, preferred_element_type=jnp.float32))


def project(x: Array, kernel: Array, bias: Array | None, eqs: tuple[str, str, str] | Product, dtype: Any,
            names: Sequence[str | None]) -> Array:
  """einsum(eqs[0], x, kernel) + bias in `dtype`, for float32 parameters (`eqs` may also be a `Product`).

  In float32 with no weight gathering this is the plain product (what the parity fixtures check). In a lower
  compute dtype, the backward pass computes the kernel and bias gradients with float32 accumulation and OUTPUT
  (a custom VJP): each gradient leaves its product in float32, so the sum over the batch's devices (an all-reduce
  or, under FSDP, a reduce-scatter that XLA places right after the product) is a float32 sum, like the originals'
  fp32 master gradients, instead of a bfloat16 sum over 64-1,024 chips. The input gradient stays in `dtype`.
  """
  product = eqs if isinstance(eqs, Product) else einsum_product(eqs)
  gather = _WEIGHT_GATHER.get()
  if jnp.dtype(dtype) == jnp.float32 and gather is None:
    y = product.forward(x.astype(dtype), kernel)
    return y if bias is None else y + bias
  gather_fn = (lambda w: w) if gather is None else (lambda w: gather(w, names))

  def forward(x, kernel, bias):
    y = product.forward(x.astype(dtype), gather_fn(kernel.astype(dtype)))
    return y if bias is None else y + bias.astype(dtype)

  @jax.custom_vjp
  def fn(x, kernel, bias):
    return forward(x, kernel, bias)

  def fn_fwd(x, kernel, bias):
    # Kept for the backward pass: the input in the compute dtype and the (sharded) float32 kernel, which is cast
    # and gathered again there rather than kept whole.
    return forward(x, kernel, bias), (x.astype(dtype), kernel, bias, jnp.zeros((0,), x.dtype))

  def fn_bwd(res, g):
    xc, kernel, bias, x_proto = res
    g = g.astype(dtype)
    dx = product.input_grad(g, gather_fn(kernel.astype(dtype))).astype(x_proto.dtype)
    dk = product.kernel_grad(xc, g).astype(kernel.dtype)
    db = None if bias is None else jnp.sum(g, axis=tuple(range(g.ndim - bias.ndim)), dtype=jnp.float32)
    return dx, dk, None if bias is None else db.astype(bias.dtype)

  fn.defvjp(fn_fwd, fn_bwd)
  return fn(x, kernel, bias)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out]."""

  def __init__(self, din: int, dout: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
               use_bias: bool = True, std: float | None = None, dtype=jnp.float32):
    std = din**-0.5 if std is None else std
    self.kernel = param(normal_init(rngs, (din, dout), std), names)
    self.bias = param(jnp.zeros((dout,), jnp.float32), names[1:]) if use_bias else None
    self.dtype = dtype
    self.names = tuple(names)

  def __call__(self, x: Array) -> Array:
    return project(x, self.kernel[...], None if self.bias is None else self.bias[...], DENSE_EQS, self.dtype,
                   self.names)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float, one_pass: bool = False) -> Array:
  """LayerNorm over the last axis, statistics in float32, output in the input dtype. `one_pass`: the variance as
  mean(x^2) - mean(x)^2 (clamped at 0), both row sums in one sweep over x, instead of mean((x - mean)^2)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  if one_pass:
    var = jnp.maximum(jnp.square(xf).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
  else:
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  return y.astype(x.dtype)


# The same function, recomputed in the backward pass from its inputs instead of keeping its float32
# intermediates (remat "elementwise").
layer_norm_recomputed = jax.checkpoint(layer_norm, static_argnums=(3, 4))

# Which variance LayerNorms built for a platform compute (by the build target, as the patch embedding's product
# is). TPU: one pass. Row sums over the lanes are the TPU's costly reductions, and the two-pass form and its
# gradient take twice as many: in the compiler's per-op estimates a LayerNorm's forward and backward cost 1.6x the
# one-pass form's, and the 1-layer B/16 step 12% more (docs/performance.md section 4, "LayerNorm on TPU"). In
# float32 the one-pass variance loses relative accuracy ~1e-7 x (mean^2 + var) / var: nothing for a pre-LN
# residual stream (its large values sit in a few channels, which raise the variance, not the mean). CPU and GPU
# keep the two-pass form the parity fixtures were checked with.
AUTO_ONE_PASS_VARIANCE = {"tpu": True}


def resolve_one_pass_variance() -> bool:
  """Whether a LayerNorm built now (for `current_target()`) computes its variance in one pass."""
  return AUTO_ONE_PASS_VARIANCE.get(current_target().platform, False)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32, output in the input dtype. `recompute`: keep only the
  input for the backward pass and recompute the rest (same values)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, name: str = "embed", recompute: bool = False):
    self.scale = param(jnp.ones((dim,), jnp.float32), (name,))
    self.bias = param(jnp.zeros((dim,), jnp.float32), (name,))
    self.eps = eps
    self.recompute = recompute
    self.one_pass = resolve_one_pass_variance()

  def __call__(self, x: Array) -> Array:
    fn = layer_norm_recomputed if self.recompute else layer_norm
    return fn(x, self.scale[...], self.bias[...], self.eps, self.one_pass)


class HeadProjection(nnx.Module):
  """x [..., embed] -> [..., heads, kv]: the q, k or v projection, kept 3-D so heads can be sharded."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    head_dim = width // heads
    self.kernel = param(normal_init(rngs, (width, heads, head_dim), width**-0.5), ("embed", "heads", "kv"))
    self.bias = param(jnp.zeros((heads, head_dim), jnp.float32), ("heads", "kv"))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    return project(x, self.kernel[...], self.bias[...], HEAD_IN_EQS, self.dtype, ("embed", "heads", "kv"))


class OutProjection(nnx.Module):
  """[..., heads, kv] -> [..., embed]."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    head_dim = width // heads
    self.kernel = param(normal_init(rngs, (heads, head_dim, width), width**-0.5), ("heads", "kv", "embed"))
    self.bias = param(jnp.zeros((width,), jnp.float32), ("embed",))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    return project(x, self.kernel[...], self.bias[...], HEAD_OUT_EQS, self.dtype, ("heads", "kv", "embed"))


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
# "auto" (the recipes' default): the implementation for the chip the model is built FOR (`current_target`, as for
# remat): our TPU kernel for CLIP-ViP's attention on TPU (docs/performance.md section 4: B/16 pretraining planned
# at 0.61x XLA's step time on v5p-64 and 0.51x on v6e-64), XLA elsewhere (cuDNN's kernel needs bfloat16 and
# fixed head dims, so it stays a choice).
AUTO_ATTENTION = {"tpu": "pallas"}


def check_attention(implementation: str, name: str = "attention") -> None:
  """One sentence (ValueError) for an unknown implementation, or the TPU kernel off a TPU; `name` is how the
  caller's user spells the setting ("config.model.attention =", "attention")."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"{name} {implementation!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
  if implementation == "pallas" and jax.default_backend() != "tpu":
    raise ValueError(f"{name} 'pallas' is the TPU kernel and this machine computes on {jax.default_backend()}: "
                     "use 'xla' (or 'cudnn' on NVIDIA GPUs)")


def resolve_attention(implementation: str | None) -> str:
  """The implementation `implementation` means on the build target (`build_target`, else JAX's default backend):
  "auto" by AUTO_ATTENTION, None as "xla", any other as itself."""
  if implementation == "auto":
    return AUTO_ATTENTION.get(current_target().platform, "xla")
  return implementation or "xla"


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None,
                          implementation: str | None = None) -> Array:
  """softmax(q k^T / sqrt(d) + bias, masked) v on [batch, seq, heads, head_dim] tensors.

  `implementation`: None/"xla" (portable default; "auto" is resolved when a model is built: `resolve_attention`),
  "cudnn" (fused flash attention on NVIDIA GPUs) or "pallas", which here means XLA's: this project's TPU kernel
  is for CLIP-ViP's proxy-guided attention (models/proxy_attention.py). It keeps tokens in lanes, which pads a
  short plain sequence (a B/32 frame's 50 tokens) to 128 lanes: planned on CLIP2Video's MSR-VTT step it was 13%
  slower than XLA (docs/performance.md section 4). The softmax is computed in float32 by every implementation,
  also for bfloat16 inputs.
  """
  if implementation == "pallas":
    implementation = "xla"
  impl = None if implementation in (None, "xla", "auto") else implementation
  if implementation == "xla":
    impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)


# Kernel partitioning. A Pallas (Mosaic) kernel cannot be split by XLA's partitioner: on a mesh it must run under
# shard_map. The trainer and the evaluator set a function (kernel, *arrays) -> the kernel applied per device to
# arrays split along their leading (batch) axis over the mesh's batch axes, while their programs are traced.
# Outside such a context (one device, tests) the kernel is called directly.
_KERNEL_PARTITION: contextvars.ContextVar[Callable[..., Array] | None] = contextvars.ContextVar(
    "kernel_partition", default=None)


@contextlib.contextmanager
def kernel_partition(fn: Callable[..., Array] | None) -> Iterator[None]:
  """Within the block, Pallas kernels traced run through `fn(kernel, *arrays)` (None: called directly)."""
  token = _KERNEL_PARTITION.set(fn)
  try:
    yield
  finally:
    _KERNEL_PARTITION.reset(token)


def batch_partition(batch_sharding: Any) -> Callable[..., Array] | None:
  """For `kernel_partition`: (kernel, *arrays [batch, ...]) -> the kernel run per device on its rows (shard_map
  over the batch axes of `batch_sharding`, a NamedSharding; everything else replicated). None without one."""
  if batch_sharding is None:
    return None
  mesh, batch_axes = batch_sharding.mesh, batch_sharding.spec[0]

  def run(kernel, *arrays):
    specs = tuple(jax.sharding.PartitionSpec(batch_axes, *([None] * (a.ndim - 1))) for a in arrays)
    return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*arrays)
  return run


def run_partitioned(kernel: Callable[..., Array], *arrays: Array) -> Array:
  """`kernel(*arrays)` per device under the `kernel_partition` being traced (directly when there is none)."""
  partition = _KERNEL_PARTITION.get()
  return partition(kernel, *arrays) if partition is not None else kernel(*arrays)


class MultiHeadAttention(nnx.Module):
  """Self-attention with separate q/k/v projections; the attention pattern comes from `attention_fn`."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    if width % heads:
      raise ValueError(f"attention width {width} is not divisible by {heads} heads")
    self.query = HeadProjection(width, heads, rngs=rngs, dtype=dtype)
    self.key = HeadProjection(width, heads, rngs=rngs, dtype=dtype)
    self.value = HeadProjection(width, heads, rngs=rngs, dtype=dtype)
    self.out = OutProjection(width, heads, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, attention_fn: AttentionFn) -> Array:
    o = attention_fn(self.query(x), self.key(x), self.value(x))
    return self.out(o)


class MLP(nnx.Module):
  """fc2(act(fc1(x))). `recompute_act`: the activation keeps only its input for the backward pass (quick_gelu
  would otherwise keep its sigmoid and two products, 3 more [tokens, mlp_dim] arrays) and is recomputed."""

  def __init__(self, width: int, mlp_dim: int, act: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
               recompute_act: bool = False):
    if act not in ACTIVATIONS:
      raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    self.fc1 = Dense(width, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(mlp_dim, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.act = act
    self.recompute_act = recompute_act

  def __call__(self, x: Array) -> Array:
    act = ACTIVATIONS[self.act]
    return self.fc2((jax.checkpoint(act) if self.recompute_act else act)(self.fc1(x)))


# Activation sharding: the trainer sets a function (x [batch, seq, width] -> x with a sharding constraint) while
# the step is traced (`activation_constraint`), and every ResidualBlock applies it to the residual stream at its
# input, middle and output. Under FSDP it keeps activations split by batch, so the partitioner gathers weights
# instead of resharding activations. Outside such a context (eval, tests, single device) nothing is constrained.
_ACTIVATION_CONSTRAINT: contextvars.ContextVar[Callable[[Array], Array] | None] = contextvars.ContextVar(
    "activation_constraint", default=None)


@contextlib.contextmanager
def activation_constraint(fn: Callable[[Array], Array] | None) -> Iterator[None]:
  """Within the block, ResidualBlocks traced apply `fn` to their residual stream (None: nothing)."""
  token = _ACTIVATION_CONSTRAINT.set(fn)
  try:
    yield
  finally:
    _ACTIVATION_CONSTRAINT.reset(token)


def constrain_activation(x: Array) -> Array:
  fn = _ACTIVATION_CONSTRAINT.get()
  return x if fn is None else fn(x)


class ResidualBlock(nnx.Module):
  """Pre-LN transformer block: x += attn(ln_1(x)); x += mlp(ln_2(x)). `recompute_elementwise`: both LayerNorms
  and the MLP activation are recomputed in the backward pass (remat "elementwise")."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, act: str = "quick_gelu", eps: float = 1e-5,
               rngs: nnx.Rngs, dtype=jnp.float32, recompute_elementwise: bool = False):
    self.ln_1 = LayerNorm(width, eps=eps, recompute=recompute_elementwise)
    self.attn = MultiHeadAttention(width, heads, rngs=rngs, dtype=dtype)
    self.ln_2 = LayerNorm(width, eps=eps, recompute=recompute_elementwise)
    self.mlp = MLP(width, mlp_dim, act, rngs=rngs, dtype=dtype, recompute_act=recompute_elementwise)

  def __call__(self, x: Array, attention_fn: AttentionFn) -> Array:
    x = constrain_activation(x)
    x = constrain_activation(x + self.attn(self.ln_1(x), attention_fn))
    return constrain_activation(x + self.mlp(self.ln_2(x)))


# Rematerialisation, per block: a jax.checkpoint policy for the whole block, or for "elementwise" none (the block
# is not checkpointed; inside it the two LayerNorms and the MLP activation are, so the backward pass keeps only
# their inputs and the matmuls' operands and recomputes the elementwise work: same values, about a quarter fewer
# saved bytes per block in float32 and no recomputed matmul). On XLA:CPU "elementwise" also keeps the backward
# pass from fusing the LayerNorm-backward chain across layers, which makes CPU steps faster (docs/performance.md
# sections 1 and 2 have the figures and the commands).
REMAT_POLICIES = {
    "none": None,
    "elementwise": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
BLOCK_REMAT = tuple(k for k, policy in REMAT_POLICIES.items() if policy is not None)  # checkpoint whole blocks
# "auto" (the configs' default): the policy measured fastest for the chip the model is built FOR, by platform and
# then by device kind (the longest matching prefix wins). XLA:CPU "elementwise" (same values; faster than "none" on
# every CPU measured: docs/performance.md section 1); GPU and TPU "none"
# unless a chip class needs memory back (docs/training.md "Per-topology defaults" has the plans behind each entry).
AUTO_REMAT = {"cpu": "elementwise", "gpu": "none", "tpu": "none"}
AUTO_REMAT_BY_KIND: dict[str, str] = {}
REMAT_CHOICES = ("auto", *REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class Target:
  """The chip a program is built for: platform ("cpu", "gpu", "tpu") and device kind ("TPU v5 lite", ...)."""
  platform: str
  device_kind: str = ""


# The target of models built in this context: set by the planner, which builds TPU programs on a CPU host, so
# that "auto" choices follow the chip the program will run on, not the machine that compiles it.
_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("target", default=None)


@contextlib.contextmanager
def build_target(target: Target | None) -> Iterator[None]:
  """Models built inside resolve "auto" settings for `target` (None: the local default backend)."""
  token = _TARGET.set(target)
  try:
    yield
  finally:
    _TARGET.reset(token)


def current_target() -> Target:
  target = _TARGET.get()
  if target is not None:
    return target
  devices = jax.devices()
  return Target(jax.default_backend(), devices[0].device_kind if devices else "")


def resolve_remat(remat: str, backend: str | None = None, device_kind: str | None = None) -> str:
  """The remat policy `remat` means on a chip (default: the build target, else JAX's default backend): "auto" is
  resolved by AUTO_REMAT_BY_KIND (device kind), then AUTO_REMAT (platform); any other known policy is itself."""
  if remat == "auto":
    if backend is None:
      target = current_target()
      backend, device_kind = target.platform, target.device_kind if device_kind is None else device_kind
    for prefix in sorted(AUTO_REMAT_BY_KIND, key=len, reverse=True):
      if device_kind and device_kind.startswith(prefix):
        return AUTO_REMAT_BY_KIND[prefix]
    return AUTO_REMAT.get(backend, "none")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; known: {list(REMAT_CHOICES)}")
  return remat


class Encoder(nnx.Module):
  """A stack of residual blocks, optionally rematerialised per block to trade compute for activation memory.

  `scan_layers`: run the blocks with `jax.lax.scan` over their parameters, stacked on a new leading axis inside
  the call (the module still holds `blocks/0`, `blocks/1`, ...: parameter names, converters and checkpoints do
  not change). Same function, one traced block instead of `layers` copies: the compiled program and the
  compilation time stop growing with depth, and XLA can no longer fuse the backward pass across layers (on
  XLA:CPU that cross-layer fusion duplicates the gradient's elementwise chain into every layer's weight-gradient
  products; docs/performance.md section 1c measures the scan). The remat policy applies to the scanned
  body. Costs a copy of the block weights per call and stacked residual buffers.
  """

  def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, *, act: str = "quick_gelu",
               eps: float = 1e-5, remat: str = "auto", scan_layers: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32):
    remat = resolve_remat(remat)
    self.blocks = nnx.List([
        ResidualBlock(width, heads, mlp_dim, act=act, eps=eps, rngs=rngs, dtype=dtype,
                      recompute_elementwise=remat == "elementwise") for _ in range(layers)
    ])
    self.remat = remat
    self.scan_layers = bool(scan_layers)

  def __call__(self, x: Array, attention_fn: AttentionFn) -> Array:
    if self.scan_layers and len(self.blocks) > 1:
      return self._scanned(x, attention_fn)
    for block in self.blocks:
      if self.remat not in BLOCK_REMAT:
        x = block(x, attention_fn)
      else:
        x = nnx.remat(lambda b, y: b(y, attention_fn), policy=REMAT_POLICIES[self.remat])(block, x)
    return x

  def _scanned(self, x: Array, attention_fn: AttentionFn) -> Array:
    blocks = list(self.blocks)
    graphdef = nnx.graphdef(blocks[0])
    if any(nnx.graphdef(b) != graphdef for b in blocks[1:]):
      raise ValueError("scan_layers needs blocks of one structure")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])

    def body(y, state):
      return nnx.merge(graphdef, state)(y, attention_fn), None

    if self.remat in BLOCK_REMAT:
      # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputation away.
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    return jax.lax.scan(body, x, stacked)[0]
