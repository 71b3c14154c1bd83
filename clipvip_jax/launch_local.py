"""python -m clipvip_jax.launch_local: the command users call; it lives in clipvip_jax.runtime.launch_local."""

import sys

from clipvip_jax.runtime.launch_local import main

if __name__ == "__main__":
  sys.exit(main())
