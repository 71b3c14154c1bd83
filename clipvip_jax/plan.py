"""python -m clipvip_jax.plan: the command users call; it lives in clipvip_jax.train.plan_command."""

import sys

from clipvip_jax.train.plan_command import main

if __name__ == "__main__":
  sys.exit(main())
