"""`python -m clipvip_jax.train --config configs/X.py --workdir DIR [--config.key=value ...]` (see train/cli.py)."""

import sys

from clipvip_jax.train.cli import train_main

if __name__ == "__main__":
  from clipvip_jax.runtime import host_allocator
  host_allocator.use_preferred()  # tcmalloc where installed: may re-execute this process, once
  from clipvip_jax.runtime import distributed
  sys.exit(distributed.finish(train_main()))
