"""python -m clipvip_jax.encode: the command users call; it lives in clipvip_jax.retrieval.encode_command."""

import sys

from clipvip_jax.retrieval.encode_command import main

if __name__ == "__main__":
  from clipvip_jax.runtime import host_allocator
  host_allocator.use_preferred()  # tcmalloc where installed: may re-execute this process, once
  sys.exit(main())
