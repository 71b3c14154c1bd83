"""Each benchmark script's main at a toy size: it runs, and its table holds sane numbers (no timing assertions)."""

import math

import jax
import pytest

from benchmarks import common
from clipvip_jax.train import model_flops
from clipvip_jax.models import clip


def test_analytic_flops_by_hand():
  """One layer of width 2, mlp 4, 3 tokens: 2*3*(4*4 + 2*2*4) matmul + 4*pairs*2 attention FLOPs."""
  cfg = clip.CLIPConfig(vision=clip.VisionConfig(width=2, layers=1, heads=1, mlp_dim=4, patch_size=1, image_size=1,
                                                 channels=1),
                        text=clip.TextConfig(width=2, layers=1, heads=1, mlp_dim=4, max_len=3), projection_dim=1)
  layer = lambda n, pairs: 2 * n * (16 + 16) + 4 * pairs * 2
  # Text of 3 tokens: full 3 x 3 scores, plus the 2 x 1 projection.
  assert model_flops.text_forward(cfg, 3) == layer(3, 9) + 4
  # One 1x1 patch per frame (L = 1), T = 2 frames, M = 2 proxies: S = 4 tokens; pairs 2*4 + 2*1*(2+1) = 14.
  patch = 2 * 2 * 1 * 2
  assert model_flops.clipvip_vision_forward(cfg, 2, 2) == patch + layer(4, 14) + 4
  assert model_flops.clipvip_vision_forward(cfg, 2, 2, "dense") == patch + layer(4, 16) + 4
  # meanP: 2 frames, each [CLS + 1 patch]: 2 sequences of 2 tokens, 4 pairs each; one projection per frame.
  assert model_flops.meanp_vision_forward(cfg, 2) == patch + 2 * layer(2, 4) + 2 * 4
  step = model_flops.meanp_step(cfg, frames=2, text_len=3, batch=5)
  assert step.train == 3 * (step.vision + step.text + 2 * 5 * 1)


def _touch_fresh_pages(size: int = 64 * 2**20) -> None:
  """Makes `size` bytes resident for the call: a fresh anonymous mapping, one byte written per page. (A malloc'd
  buffer may reuse pages the process already holds, and a zeroed one may stay untouched: no peak either way.)"""
  import mmap
  with mmap.mmap(-1, size) as pages:
    for offset in range(0, size, mmap.PAGESIZE):
      pages[offset] = 1


def test_timing_helpers_interleave_and_report_memory():
  calls = []
  out = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=2)
  assert calls == ["a", "b", "a", "b", "a", "b"]
  assert len(out["a"].seconds) == 2 and out["a"].median >= 0
  grow = common.median_time(_touch_fresh_pages, warmup=0, repeats=1)
  if grow.peak_delta:  # Linux: the 64 MiB allocation shows in the step's peak RSS
    assert grow.peak_delta_bytes >= 32 * 2**20


@pytest.mark.slow
def test_train_step_main_tiny(tmp_path):
  from benchmarks import train_step
  rows = train_step.main(["--variants", "tiny", "--tiny", "--warmup", "0", "--repeats", "1",
                          "--ours-variants", "base,scan_layers+remat=elementwise,where_skip",
                          "--json", str(tmp_path / "rows.json")])
  assert [r["impl"] for r in rows] == ["ours", "ours+scan_layers+remat=elementwise", "ours+where_skip", "peer"]
  for r in rows:
    assert r["step_s"] > 0 and math.isfinite(r["clips_per_s"]) and r["clips_per_s"] > 0
    assert r["flops_model_per_clip"] > 0 and math.isfinite(r["first_loss"])
  ours = rows[0]
  assert ours["recompiles"] == 0
  # Config options and experiments compute the same function from the same initial parameters.
  for other in rows[1:3]:
    assert other["vs_peer"] > 0
    assert other["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-5)
  # XLA's count includes what the analytic count leaves out (LayerNorm, softmax, optimiser), so it is larger,
  # but of the same order at this size.
  assert ours["flops_xla_per_clip"] > 0.5 * ours["flops_model_per_clip"]
  assert (tmp_path / "rows.json").exists()


@pytest.mark.slow
def test_memory_scaling_main_tiny():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  from benchmarks import memory_scaling
  # One remat policy for the compiled part (each layout x policy is two compilations, ~20 s here); the
  # per-policy saved-activation estimates below still cover every policy.
  result = memory_scaling.main(["--models", "B/16", "--tiny", "--layouts", "data,fsdp", "--remat", "full",
                                "--loss-batches", "64,256"])
  rows = {(r["layout"], r["remat"]): r for r in result["rows"]}
  assert set(rows) == {("data", "full"), ("fsdp", "full")}
  # FSDP splits parameters and optimiser state over the 8 devices (a few small tensors stay whole).
  assert rows["fsdp", "full"]["params"] < rows["data", "full"]["params"] / 4
  assert rows["fsdp", "full"]["optimizer"] < rows["data", "full"]["optimizer"] / 4
  for r in rows.values():
    assert r["per_clip"] > 0 and r["peak_b1"] > r["params"] + r["optimizer"]
    assert r["max_batch_80gb"] >= r["max_batch_16gb"] > 0
  assert len(result["loss"]) == 2 and all(r["temp"] > 0 for r in result["loss"])
  # Saved activations per clip: full remat keeps only block inputs, so less than no remat.
  saved = {e["remat"]: e["saved_per_clip"] for e in result["estimates"]}
  assert 0 < saved["full"] < saved["dots"] <= saved["none"]


def test_loss_memory_main_reports_per_device_bytes():
  from benchmarks import loss_memory
  rows = loss_memory.main(["--batches", f"{8 * jax.device_count()},{32 * jax.device_count()}", "--dim", "16"])
  assert [r["devices"] for r in rows] == [jax.device_count()] * 2
  assert all(r["temp"] > 0 for r in rows) and rows[1]["temp"] > rows[0]["temp"]


@pytest.mark.slow
def test_gpu_train_step_main_tiny_on_cpu():
  from benchmarks import gpu_train_step
  rows = gpu_train_step.main(["--tiny", "--remat", "full", "--steps", "2", "--warmup", "1",
                              "--peak-repeats", "1"])
  impls = [(r["impl"], r["remat"], r["input"]) for r in rows]
  assert ("ours", "full", "device-resident") in impls and ("ours", "full", "grain") in impls
  assert ("ours+scan_layers", "full", "device-resident") in impls
  assert rows[-1]["impl"].startswith("peer")
  for r in rows:
    assert r["step_s"] > 0 and r["clips_per_s"] > 0 and 0 < r["mfu"] < 10


def test_input_pipeline_main_tiny(tmp_path):
  """Both shard layouts (frames resized by the pipeline, model-ready frames), both decoders, one worker count."""
  from benchmarks import input_pipeline
  rows = input_pipeline.main(["--clips", "8", "--stored-frames", "6", "--frames", "4", "--image-size", "32",
                              "--short-side", "48", "--workers", "0", "--seconds", "0.5", "--warmup", "1",
                              "--batch-size", "4", "--shard-dir", str(tmp_path)])
  costs = {(r["layout"], r["decoder"]): r for r in rows if "decoder" in r}
  assert set(costs) == {(layout, d) for layout in input_pipeline.LAYOUTS for d in ("pil", "simplejpeg")}
  assert all(r["clips_per_cpu_s"] > 0 and r["jpeg decode"] > 0 for r in costs.values())
  assert all(costs[("ready", d)]["resize"] < costs[("short256", d)]["resize"] for d in ("pil", "simplejpeg"))
  assert {r["layout"] for r in rows if "workers" in r} == set(input_pipeline.LAYOUTS)


@pytest.mark.slow
def test_host_allocator_main_tiny():
  """Every allocator row runs the step in its own process; glibc's row faults its temporaries in again at every
  step, MALLOC_KEEP's does not (the effect the commands' tcmalloc is there for)."""
  from benchmarks import host_allocator
  rows = host_allocator.main(["--variant", "tiny", "--batch", "2", "--frames", "2", "--image-size", "32",
                              "--text-len", "8", "--steps", "2", "--rounds", "1",
                              "--only", "glibc,glibc keep (MALLOC_KEEP),tcmalloc"])
  by_name = {r["allocator"]: r for r in rows}
  assert {"glibc", "glibc keep (MALLOC_KEEP)"} <= set(by_name)
  for r in rows:
    assert len(r["times"]) == 2 and all(t > 0 for t in r["times"]) and r["temp_bytes"] > 0
  keep = by_name["glibc keep (MALLOC_KEEP)"]
  assert max(keep["faults"]) < 1000, keep["faults"]  # nothing is unmapped between steps, so nothing faults


def test_plan_bytes_reads_operands_and_results_off_the_optimised_hlo():
  """benchmarks/plan_bytes.py: a fusion counts its operands and result, split by memory space (S(1): on chip); an
  async copy or slice counts its destination read and written, not its source buffer; views and ConcatBitcast
  count nothing."""
  from benchmarks import plan_bytes
  hlo = """
ENTRY %main.1 (p0: bf16[64,128], p1: f32[1024]) -> bf16[64,128] {
  %p0 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s8[4096]{0} parameter(1)
  %fusion.1 = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} fusion(%p0), kind=kLoop, metadata={op_name="jit(step)/jvp()/add" source_line=3}
  %slice-start.1 = ((s8[4096]{0}), s8[512]{0:S(1)}, s32[]) slice-start(%p1), metadata={op_name="x"}
  %copy-start.2 = (bf16[64,128]{1,0}, bf16[64,128]{1,0}, u32[]) copy-start(%fusion.1)
  %custom-call.3 = f32[128]{0:S(1)} custom-call(%slice-start.1), custom_call_target="ConcatBitcast"
  %bitcast.4 = bf16[8192]{0} bitcast(%fusion.1)
  ROOT %fusion.5 = bf16[64,128]{1,0} fusion(%fusion.1, %p0), kind=kOutput, metadata={op_name="jit(step)/jvp(...i,io->...o)/dot_general"}
}
"""
  a = 64 * 128 * 2
  assert plan_bytes.op_bytes(hlo) == {
      "jit(step)/jvp()/add": [a, a],  # reads p0 from HBM, writes its result on chip
      "x": [0, 2 * 512],  # the 512-byte destination, not the 4096-byte source
      "(copy-start, no op name)": [2 * a, 0],
      "jit(step)/jvp(...i,io->...o)/dot_general": [2 * a, a]}


def test_plan_bytes_reads_the_compilers_cycles_per_op():
  """benchmarks/plan_bytes.py: each entry op's estimated_cycles, summed by JAX op name (digits folded)."""
  from benchmarks import plan_bytes
  cfg = lambda n: '{"window_config":{"estimated_cycles":"%d"}}' % n
  hlo = f"""
ENTRY %main.1 (p0: bf16[64,128]) -> bf16[64,128] {{
  %fusion.1 = bf16[64,128]{{1,0}} fusion(%p0), kind=kLoop, metadata={{op_name="jit(step)/layer_1/add"}}, backend_config={cfg(300)}
  %fusion.2 = bf16[64,128]{{1,0}} fusion(%fusion.1), kind=kLoop, metadata={{op_name="jit(step)/layer_2/add"}}, backend_config={cfg(200)}
  %copy.3 = bf16[64,128]{{0,1}} copy(%fusion.2), backend_config={cfg(50)}
  ROOT %bitcast.4 = bf16[8192]{{0}} bitcast(%copy.3)
}}
"""
  assert plan_bytes.op_cycles(hlo) == {"jit(step)/layer_#/add": 500, "(copy, no op name)": 50}


def test_plan_micro_times_both_patch_products_on_cpu(capsys):
  """benchmarks/plan_micro.py's CPU table (its TPU table needs libtpu and is run by hand): both products run and
  get a ratio."""
  from benchmarks import plan_micro
  plan_micro._cpu_table(frames=2, repeats=1)  # pylint: disable=protected-access
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float32") or
          line.startswith("| bfloat16")]
  assert len(rows) == 2 and all(float(r.split("|")[4].strip().rstrip("x")) > 0 for r in rows)
