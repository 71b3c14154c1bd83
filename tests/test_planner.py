"""The TPU planner (clipvip_jax.plan): the trainer's own step compiled by libtpu for small slices, with no TPU.

Compiles run one at a time (libtpu allows one process), so everything that compiles for a TPU lives in this file
(one xdist worker) and the tiny test model keeps each compile to seconds.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FULLY_OPTIMISED_ENV

from clipvip_jax.train import cli, planner, sharding, targets, trainer
from clipvip_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CI = os.environ.get("CI", "").lower() == "true"


# The tiny test model with a vision tower whose activations, not the text tower's 49,408-row embedding, dominate
# the step's memory: 2 layers of width 64 on 8 frames of 128 x 128 (256 patches each). (One layer would compile a
# quarter faster, but full remat then frees too little of the step's ~80 MB of fixed temporaries to tell from
# noise; and at 64 x 64, since the TPU build computes the patch embedding as a convolution, not as an einsum whose
# lane-padded relayout of the frames grew with the batch, 4x the batch added under 1 MB.)
VISION = {"model.clip.vision.width": 64, "model.clip.vision.mlp_dim": 256, "model.clip.vision.layers": 2,
          "model.clip.vision.image_size": 128, "data.image_size": 128, "data.num_frames": 8,
          "model.config.temporal_size": 8}


def _config(**overrides):
  config = cli.load_config(str(REPO / "configs/tiny_test.py"))
  config.model.dtype = "bfloat16"
  config.data.dtype = "uint8"
  config.data.batch_size = 16
  config.eval.batch_size = 8
  for key, value in {**VISION, **overrides}.items():
    cli.apply_override(config, key, repr(value))
  return config


@pytest.fixture(scope="module")
def libtpu():
  if targets.libtpu_dir() is None:
    try:
      import libtpu  # noqa: F401
    except ImportError:
      if CI:
        pytest.fail("libtpu is not installed: `make tpu` must run before the planner's tests")
      pytest.skip("libtpu not installed (make tpu)")
  return targets.ensure_libtpu()


def _flags(**overrides) -> list[str]:
  """The command-line form of _config(**overrides)."""
  settings = {"model.dtype": "bfloat16", "data.dtype": "uint8", "data.batch_size": 16, "eval.batch_size": 8,
              **VISION, **overrides}
  return [f"--config.{k}={v!r}" for k, v in settings.items()]


# The suite compiles with most optimisations off (tests/conftest.py); a plan's facts are those of the optimised
# program a run gets, so the planner's compiles here, and its commands, keep every optimisation.
pytestmark = pytest.mark.usefixtures("fully_optimised")


def _run(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "clipvip_jax.plan", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, **FULLY_OPTIMISED_ENV, **(env or {})})


# ------------------------------------------------------------------------------------- the trainer's own program


def _real_lowering(config, mesh):
  """What the trainer lowers: setup_training with real weights and a placed batch of the pipeline's shapes."""
  rules = config.sharding_rules
  setup = trainer.setup_training(config, mesh, rules, int(config.total_steps))
  spec = step_lib.batch_spec(config.data, setup.objective, sharding.batch_sharding(mesh, rules, 1))
  batch = {k: jax.device_put(np.zeros(v.shape, v.dtype), v.sharding) for k, v in spec.items()}
  return setup.train_step.fn.lower(setup.model.params, setup.opt_state, batch).as_text()


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1)])  # data x FSDP: the weight gathering included
def test_planner_lowers_the_trainers_program(mesh_shape):
  if len(jax.devices()) < 8:
    pytest.fail("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  config = _config(mesh=mesh_shape)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
  # Lowering does not depend on XLA's optimisation level; the real setup's weight initialisation compiles for
  # this CPU, which the suite does with most optimisations off (30 -> ~10 s).
  optimised = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    _, abstract = planner.lower_train_step(config, mesh)
    assert abstract.as_text() == _real_lowering(config, mesh)
  finally:
    jax.config.update("jax_disable_most_optimizations", optimised)


def test_batch_spec_is_what_the_pipeline_yields(tmp_path_factory):
  from conftest import synthetic_shards
  from data_pipelines import pipeline
  shards = synthetic_shards(tmp_path_factory, num_clips=16, seed=0)
  data = {**_config().data.to_dict(), "shard_dir": str(shards), "read_threads": 0}
  spec = pipeline.batch_spec(data)
  with pipeline.make_train_iterator(data) as batches:
    batch = next(batches)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec


# ------------------------------------------------------------------------------------- compiled for TPU slices


@pytest.fixture(scope="module")
def v5e_plan(libtpu):
  """The test model on v5e:2x2 with the search on: 4 clips per chip leave the HBM almost empty, so it also compiles
  the global batch x2 and x4 (TPU programs cannot be cached: each compile here is a real one)."""
  return planner.plan(_config(), "v5e:2x2", search=True, with_eval=True)


def test_plan_of_a_small_v5e_slice(v5e_plan):
  p = v5e_plan
  assert (p["chip"], p["num_chips"], p["device_kind"]) == ("v5e", 4, "TPU v5 lite")
  assert p["hbm_capacity_bytes"] == 16 * 1024**3 and 0 < p["hbm_peak_bytes"] < p["hbm_capacity_bytes"]
  assert p["fits"] and p["hbm"]["arguments"] > 0 and p["hbm"]["temporaries"] > 0
  assert p["model_flops"] > 0 and p["compiler_flops"] > 0 and p["step_seconds"] > 0
  assert p["step_seconds_source"] in ("compiler", "roofline") and 0 < p["mfu"] < 1
  assert p["op_sum"]["cycles"] > 0 and p["op_sum"]["seconds"] > 0 and 0 < p["op_sum"]["mfu"] < 1
  assert p["remat"] == "none"  # "auto" resolved for the TPU target, not for this CPU host ("elementwise")
  assert p["constrain_activations"] is True  # "auto", resolved for the TPU target too (on this CPU host: False)
  # Data parallel: the gradients are summed over the 4 chips in float32 (bytes >= 4 x the parameter count).
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(planner.lower_train_step(
      _config(), planner.make_mesh(_config(), targets.describe("v5e:2x2").devices))[0].model.params))
  assert p["collectives"]["all-reduce"]["bytes"] >= 4 * params
  assert set(p["eval"]) == {"encode_video", "encode_text"}
  assert all(e["fits"] and e["compiler_flops"] > 0 for e in p["eval"].values())


def test_memory_follows_batch_remat_and_fsdp(libtpu, v5e_plan):
  def peak(**kw):
    return planner.plan(_config(**kw), "v5e:2x2", search=False, with_eval=False)["hbm"]

  base = v5e_plan["hbm"]
  bigger = {tuple(t["flags"]): t for t in v5e_plan["alternatives"]}[("--config.data.batch_size=64",)]["hbm"]
  assert bigger["temporaries"] > base["temporaries"] + 4e6, (base, bigger)
  full = peak(**{"model.remat": "full", "data.batch_size": 64})
  assert full["temporaries"] < bigger["temporaries"] - 1e6, (bigger, full)
  fsdp = {tuple(t["flags"]): t for t in v5e_plan["alternatives"]}[("--config.mesh=(1,-1,1)",)]["hbm"]
  assert fsdp["arguments"] < base["arguments"] / 3  # parameters and both Adam moments split 4 ways
  assert fsdp["peak"] < base["peak"]


def test_a_recipe_that_does_not_fit_gets_a_suggestion_that_does(libtpu, v5e_plan, tmp_path):
  # 60% of the recipe's HBM: it no longer fits, and with remat already "full" the first alternative tried is FSDP
  # over the 4 chips (a quarter of the parameters and moments per chip, measured at ~30% of the peak).
  budget = int(0.6 * v5e_plan["hbm_peak_bytes"])
  out = tmp_path / "plan.json"
  r = _run("--config", str(REPO / "configs/tiny_test.py"), "--topology", "v5e:2x2", "--no-eval",
           "--min-headroom", "0", "--hbm-gib", repr(budget / 1024**3), "--json", str(out),
           *_flags(**{"model.remat": "full"}))
  assert r.returncode == 0, r.stderr
  p = json.loads(out.read_text())
  assert not p["fits"] and p["suggestion"], p
  assert "does not fit; use: --config." in r.stdout and "HBM" in r.stdout and "collectives" in r.stdout
  assert p["suggestion"] == ["--config.mesh=(1,-1,1)"]
  # The suggestion fits: the printed flags applied to the recipe and compiled again, independently of the search
  # that chose them (a TPU compile of the tiny model; it cannot come from the cache).
  suggested = planner.Variant(tuple(p["suggestion"])).apply(_config(**{"model.remat": "full"}))
  again = planner.plan(suggested, "v5e:2x2", search=False, with_eval=False, hbm_bytes=budget)
  assert again["fits"]


def test_idle_memory_gets_a_larger_per_chip_batch_offered(v5e_plan):
  """4 clips per chip leave a v5e's HBM almost empty: the search compiles the global batch x2 and x4 and, the plan
  being data-parallel over 4 chips, FSDP over them, and offers the fastest per clip, saying when it changes the
  optimisation."""
  p = v5e_plan
  assert p["headroom"] > 0.5
  tried = {tuple(t["flags"]): t for t in p["alternatives"]}
  fsdp = ("--config.mesh=(1,-1,1)",)
  assert set(tried) == {("--config.data.batch_size=32",), ("--config.data.batch_size=64",), fsdp}
  assert [tried[k]["global_batch"] for k in sorted(tried)] == [32, 64, 16]
  assert all(t["fits"] and t["hbm_peak_bytes"] > p["hbm_peak_bytes"] for k, t in tried.items() if k != fsdp)
  per_clip = {k: t["step_seconds"] / t["global_batch"] for k, t in tried.items()}
  best = min(per_clip, key=per_clip.get)
  if per_clip[best] < 0.98 * p["step_seconds"] / p["global_batch"]:
    assert tuple(p["suggestion"]) == best
    assert ("changes the optimisation" in p.get("suggestion_note", "")) == (best != fsdp)
  else:
    assert "suggestion" not in p


def test_the_command_plans_a_v4_slice(libtpu, tmp_path):
  out = tmp_path / "v4.json"
  r = _run("--config", str(REPO / "configs/tiny_test.py"), "--topology", "v4:2x2x1", "--no-search", "--no-eval",
           "--json", str(out))
  assert r.returncode == 0, r.stderr
  p = json.loads(out.read_text())
  assert p["chip"] == "v4" and p["num_chips"] == 4 and p["hbm_capacity_bytes"] == 32 * 1024**3
  for key in ("fits", "hbm_peak_bytes", "model_flops", "compiler_flops", "collectives", "step_seconds"):
    assert key in p
  assert "v4:2x2x1: 4 x v4" in r.stdout and "MFU" in r.stdout


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5e:2x2"])
def test_the_proxy_attention_kernel_lowers_for_a_tpu_and_reads_fewer_bytes_than_xla(libtpu, topology):
  """attention="pallas": Mosaic lowers the kernel (forward and backward, padded frames masked) for the chip, and
  the TPU compiler's count of HBM bytes for CLIP-ViP's attention with its gradient is well under XLA's
  block-sparse program (which writes and re-reads float32 scores and copies q, k, v into frame groups).
  CLIP-ViP's frame shape: 4 proxies + 3 frames of 196 patches, 2 heads of 64."""
  from jax.sharding import SingleDeviceSharding

  from clipvip_jax.models import proxy_attention as pa

  sharding = SingleDeviceSharding(targets.describe(topology).devices[0])
  b, m, t, l, heads = 2, 4, 3, 196, 2
  spec = lambda shape, dtype=jax.numpy.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  qkv = spec((b, m + t * l, heads, 64))

  def bytes_accessed(implementation):
    def step(q, k, v, frame_mask, cot):
      fn = lambda q, k, v: pa.block_sparse_proxy_attention(  # noqa: E731
          q, k, v, num_proxies=m, num_frames=t, frame_mask=frame_mask, implementation=implementation)
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(cot)
    compiled = jax.jit(step).lower(qkv, qkv, qkv, spec((b, t), jax.numpy.int32), qkv).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"], compiled.as_text()

  kernel_bytes, text = bytes_accessed("pallas")
  xla_bytes, _ = bytes_accessed("xla")
  assert "tpu_custom_call" in text  # the Mosaic kernel is in the program, not a fallback
  assert kernel_bytes < 0.5 * xla_bytes, (kernel_bytes, xla_bytes)


def test_auto_attention_compiles_the_kernel_into_a_tpu_slices_training_step(libtpu):
  """The recipes' attention "auto" on a TPU slice: the trainer's step, data-parallel over 4 chips, compiles with
  the proxy-attention kernel under shard_map (forward and backward of both vision layers), and the plan says so."""
  from clipvip_jax.models import layers
  config = _config(**{"model.attention": "auto"})
  slice_ = targets.describe("v5e:2x2")
  mesh = planner.make_mesh(config, slice_.devices)
  _, lowered = planner.lower_train_step(config, mesh, layers.Target(slice_.platform, slice_.device_kind))
  text = lowered.compile(slice_.compiler_options or None).as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 4, text.count("tpu_custom_call")
  with layers.build_target(layers.Target(slice_.platform, slice_.device_kind)):
    assert layers.resolve_attention("auto") == "pallas"


@pytest.mark.parametrize("args, sentence", [
    (("--topology", "v9z:2x2"), "unknown topology 'v9z:2x2'"),
    (("--topology", "v5e:3x3"), "libtpu does not accept the topology 'v5e:3x3'"),
    (("--topology", "v5e:2x2", "--config.data.batch_size=6"), "the global batch 6 does not divide over the 4"),
    (("--topology", "v5e:2x2", "--config.mesh=(8,1,1)"), "config.mesh (8, 1, 1) does not match the slice's 4 chips"),
    (("--topology", "v5e:2x2", "--config.model.lerning_rate=1"), "config.model.lerning_rate is not a config key"),
    (("--topology", "h100:0"), "GPUs are named h100:N (one host of N) or h100:HxN"),
])
def test_bad_arguments_are_one_sentence(libtpu, args, sentence, capsys, monkeypatch):
  """The command's own entry point, in this process (test_missing_libtpu_names_the_install_line and the v4 plan
  run it as a separate process): exit status 2 and one sentence, no traceback."""
  from clipvip_jax.train import plan_command
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # what the command sets; restored after the test
  with pytest.raises(SystemExit) as exit_info:
    plan_command.main(["--config", str(REPO / "configs/tiny_test.py"), "--no-eval", "--no-search", *args])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[-1].startswith("python -m clipvip_jax.plan: error: ") and sentence in lines[-1], err
  assert "Traceback" not in err


@pytest.fixture(scope="module")
def cuda_plugin():
  if targets.cuda_plugin_dir() is None:
    if CI:
      pytest.fail("the JAX CUDA plugin is not installed: `make gpu-plan` must run before the planner's tests")
    pytest.skip("the JAX CUDA plugin is not installed (make gpu-plan)")


def test_the_command_plans_gpus_without_one(cuda_plugin, tmp_path):
  """Two H100s described by the JAX CUDA plugin, compiled by XLA's GPU compiler on this CPU host: memory and
  collectives from the compiled program; no time estimate (the GPU compiler gives no cost analysis)."""
  out = tmp_path / "h100.json"
  r = _run("--config", str(REPO / "configs/tiny_test.py"), "--topology", "h100:2", "--no-search", "--no-eval",
           "--json", str(out), *_flags())
  assert r.returncode == 0, r.stderr
  p = json.loads(out.read_text())
  assert (p["platform"], p["chip"], p["num_chips"], p["device_kind"]) == ("gpu", "h100", 2, "NVIDIA H100 80GB HBM3")
  assert p["hbm_capacity_bytes"] == targets.GPUS["h100"].chip.hbm_bytes and 0 < p["hbm_peak_bytes"] < 1024**3
  assert p["hbm"]["arguments"] > 0 and p["hbm"]["temporaries"] > 0 and p["fits"]
  assert p["remat"] == "none"  # "auto" resolved for the GPU target
  assert p["step_seconds"] is None and p["step_seconds_source"] == "none" and p["model_flops"] > 0
  assert p["op_sum"] is None  # no per-op cycle estimates from the GPU compiler either
  assert p["collectives"]["all-reduce"]["bytes"] > 0  # the gradients summed over the two GPUs
  assert "no estimate" in r.stdout and p["compiler"].startswith("jax-cuda12-plugin")


def test_missing_libtpu_names_the_install_line(tmp_path):
  r = _run("--config", str(REPO / "configs/tiny_test.py"), "--topology", "v5e:2x2",
           env={"CLIPVIP_LIBTPU_DIR": str(tmp_path)})
  assert r.returncode == 2
  assert "libtpu is not installed" in r.stderr and "make tpu" in r.stderr and "Traceback" not in r.stderr


def test_ordinary_use_never_loads_libtpu(libtpu):
  """With libtpu installed (make tpu), the package and its commands run on CPU with no TPU start-up or warning."""
  code = ("import sys, jax, clipvip_jax, jax.numpy as jnp; from clipvip_jax.train import trainer; "
          "print(jax.default_backend(), float(jax.jit(lambda x: x * 2)(jnp.ones(()))), 'libtpu' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                     env={k: v for k, v in os.environ.items() if not k.startswith("TPU_")})
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["cpu", "2.0", "False"]
  assert "TPU" not in r.stderr and "libtpu" not in r.stderr, r.stderr


def test_the_op_sum_reads_the_compilers_cycles_as_the_core_runs_them():
  """Entry ops' estimated_cycles at the chip's clock; a Pallas kernel at the roofline of its declared cost; a
  conditional's dearer branch; a loop body times its trip count; fusion bodies not twice; no clock, no sum."""
  cfg = lambda cycles: '{"flag_configs":[],"window_config":{"estimated_cycles":"%d"}}' % cycles
  hlo = f"""
%fused_computation.1 (p: f32[8]) -> f32[8] {{
  %inner = f32[8]{{0}} multiply(%p, %p), backend_config={cfg(999999)}
}}
%cheap_branch (p: f32[8]) -> f32[8] {{
  %c1 = f32[8]{{0}} copy(%p), backend_config={cfg(100)}
}}
%dear_branch (p: f32[8]) -> f32[8] {{
  %c2 = f32[8]{{0}} copy(%p), backend_config={cfg(5000)}
}}
%loop_body (p: f32[8]) -> f32[8] {{
  %c3 = f32[8]{{0}} copy(%p), backend_config={cfg(300)}
}}
ENTRY %main.1 (p0: f32[8]) -> f32[8] {{
  %fusion.1 = f32[8]{{0}} fusion(%p0), kind=kLoop, calls=%fused_computation.1, backend_config={cfg(2000)}
  %kernel = f32[8]{{0}} custom-call(%fusion.1), custom_call_target="tpu_custom_call", backend_config={{"custom_call_config":{{"body":"x","cost_estimate":{{"flops":"2000000","transcendentals":"5","bytes_accessed":"3000"}}}}}}
  %conditional = f32[8]{{0}} conditional(%pred, %kernel, %kernel), branch_computations={{%cheap_branch, %dear_branch}}
  %while = f32[8]{{0}} while(%conditional), condition=%cond, body=%loop_body, backend_config={{"known_trip_count":{{"n":"4"}}}}
  %copy-start = (f32[8]{{0}}, f32[8]{{0}}, u32[]) copy-start(%while)
}}
"""
  chip = targets.Chip("test", 1, 1e12, 1e9, 1e9, 1e6)  # 1 MHz: a cycle is a microsecond
  ops = planner.op_sum(hlo, chip)
  assert ops["cycles"] == 2000 + 5000 + 4 * 300
  assert ops["op_seconds"] == pytest.approx(8200e-6)
  assert ops["kernel_seconds"] == pytest.approx(max(2e6 / 1e12, 3000 / 1e9))  # 3 us: its bytes bound it
  assert ops["seconds"] == pytest.approx(8200e-6 + 3e-6)
  assert planner.op_sum(hlo, targets.Chip("gpu", 1, 1e12, 1e9, 1e9)) is None
  assert planner.op_sum("ENTRY %m () -> f32[] {\n  %c = f32[] constant(0)\n}\n", chip) is None


def test_collectives_are_read_off_the_optimised_hlo():
  hlo = """
%all-reduce-scatter.3 (input_0: f32[64,32]) -> (f32[16,32]) {
  %all-reduce.9 = (f32[64,32]{1,0}) all-reduce(%input_0), channel_id=1, replica_groups={{0,1,2,3}}
}
ENTRY %main.1 (p0: f32[16,32], p1: bf16[8,4]) -> f32[64,32] {
  %all-gather-start = (bf16[8,4]{1,0}, bf16[32,4]{1,0}) all-gather-start(%p1), channel_id=2, dimensions={0}
  %all-reduce.1 = (f32[64,32]{1,0}, bf16[10]{0}) all-reduce(%a, %b), channel_id=3
  %collective-permute-start.1 = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%c), channel_id=4
  %all-to-all.2 = f32[4,1,512]{2,1,0} all-to-all(%d), channel_id=5, dimensions={0}
}
%fused_consumer.1 (param_0.1: f32[2,64]) -> f32[8,2,64] {
  %all-gather.7 = f32[8,2,64]{2,1,0:T(2,128)S(1)} all-gather(%param_0.1), channel_id=6, dimensions={0}
}
%fused_consumer.2 (param_0.2: f32[2,64]) -> f32[8,2,64] {
  %all-gather.8 = f32[8,2,64]{2,1,0:T(2,128)S(1)} all-gather(%param_0.2), channel_id=6, dimensions={0}
}
"""
  # The last two: one gather the TPU compiler copied into two consumers (same channel_id): 2 ops, 1 distinct.
  gathered = 8 * 2 * 64 * 4
  assert planner.collectives(hlo) == {
      "reduce-scatter": {"count": 1, "bytes": 64 * 32 * 4, "distinct": 1},
      "all-gather": {"count": 3, "bytes": 32 * 4 * 2 + 2 * gathered, "distinct": 2},
      "all-reduce": {"count": 1, "bytes": 64 * 32 * 4 + 20, "distinct": 1},
      "collective-permute": {"count": 1, "bytes": 16, "distinct": 1},
      "all-to-all": {"count": 1, "bytes": 4 * 512 * 4, "distinct": 1}}
