"""`python -m clipvip_jax.train --config configs/X.py --workdir DIR [--config.key=value ...]` (see train/cli.py)."""

import sys

from clipvip_jax.train.cli import train_main

if __name__ == "__main__":
  sys.exit(train_main())
