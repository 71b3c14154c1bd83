"""best.json always names a checkpoint that retention kept, ties included."""

import jax.numpy as jnp

from clipvip_jax.train import checkpoint


def test_best_checkpoint_survives_retention_with_ties(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, best_metric="val/t2v/R@1", async_save=False)
  params = {"w": jnp.ones((2,))}
  for step, r1 in ((1, 5.0), (2, 7.0), (3, 7.0), (4, 3.0), (5, None)):
    metrics = None if r1 is None else {"val/t2v/R@1": r1}
    ckpt.save(step, params, {"m": jnp.zeros((2,))}, "{}", {}, {}, metrics)
  ckpt.manager.wait_until_finished()
  best = checkpoint.resolve_step(tmp_path, "best")
  assert best.name == "3" and best.exists()
  assert sorted(ckpt.all_steps()) == [3, 5]  # the best (latest of the tie) and the latest
