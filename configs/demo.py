"""The README demo's recipe: a small CLIP-ViP and the same-size meanP baseline, trained from scratch on the
synthetic set. The recipe itself is clipvip_jax/recipes/demo.py, in the package, so that `python -m clipvip_jax.demo`
finds it in an installed copy too; this file is the path to pass to --config:

  python -m clipvip_jax.train --config configs/demo.py:clipvip --workdir runs/demo_clipvip \
      --config.data.shard_dir=demo_out/data
"""

from clipvip_jax.recipes.demo import IMAGE_SIZE, MAX_TEXT_LEN, NUM_FRAMES, get_config  # noqa: F401
