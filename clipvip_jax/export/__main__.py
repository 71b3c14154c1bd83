"""python -m clipvip_jax.export: the command lives in clipvip_jax.export.command."""

import sys

from clipvip_jax.export.command import main

if __name__ == "__main__":
  sys.exit(main())
