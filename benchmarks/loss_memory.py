"""Per-device memory of the global-batch contrastive loss, from compiled memory statistics on simulated devices.

  python -m benchmarks.loss_memory --devices 256 --batches 1024,16384,65536

`losses.nce_loss` and its gradient (with respect to both feature sets and the temperature) are jitted as the
trainer runs them: features [B, D] split over all devices along the batch ("data") axis, no explicit gather; the
partitioner decides how the B x B logits are laid out. The script reports XLA's temporary bytes per device next to
the size of one whole B x B float32 logits matrix, which is what a replicated loss would hold several times over.
The inputs are abstract (jax.ShapeDtypeStruct), so nothing of size B x B is ever allocated here.
"""

from __future__ import annotations

import os
import sys


def _devices_from_argv(argv: list[str]) -> int | None:
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
  return None


if __name__ == "__main__" and "jax" not in sys.modules:  # the device count must be fixed before jax starts
  _n = _devices_from_argv(sys.argv[1:]) or 256
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}").strip()

import argparse  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks import common  # noqa: E402
from clipvip_jax import losses  # noqa: E402
from clipvip_jax.train import sharding  # noqa: E402


def loss_memory(global_batch: int, dim: int) -> dict[str, Any]:
  """Per-device temporary bytes of value_and_grad(nce_loss) at `global_batch`, features split over all devices."""
  mesh = sharding.make_mesh((-1, 1, 1))
  if global_batch % mesh.size:
    raise ValueError(f"global batch {global_batch} is not divisible by the {mesh.size} devices")
  feats = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  fn = jax.jit(jax.value_and_grad(losses.nce_loss, argnums=(0, 1, 2)))
  mem = fn.lower(feats, feats, scale).compile().memory_analysis()
  return {"global_batch": global_batch, "devices": mesh.size, "temp": mem.temp_size_in_bytes,
          "logits_bytes": 4 * global_batch * global_batch}


def table(rows: list[dict[str, Any]]) -> str:
  return common.markdown_table(
      ["global batch", "devices", "rows per device", "NCE value+grad temp per device", "one whole B x B f32 logits"],
      [[r["global_batch"], r["devices"], r["global_batch"] // r["devices"], common.fmt_bytes(r["temp"]),
        common.fmt_bytes(r["logits_bytes"])] for r in rows])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=256, help="simulated devices (only when run as a script)")
  p.add_argument("--batches", default="1024,16384,65536")
  p.add_argument("--dim", type=int, default=512, help="embedding size (512 for B/32 and B/16, 768 for L/14)")
  args = p.parse_args(argv)
  print(f"{jax.device_count()} simulated {jax.devices()[0].platform} devices; embedding size {args.dim}")
  rows = [loss_memory(int(b), args.dim) for b in args.batches.split(",") if b]
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
