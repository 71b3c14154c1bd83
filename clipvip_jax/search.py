"""python -m clipvip_jax.search: the command users call; it lives in clipvip_jax.retrieval.search_command.

`from clipvip_jax.search import search, Searcher` keeps working for library use (clipvip_jax.retrieval.search).
"""

import sys

from clipvip_jax.retrieval.search import Searcher, search  # noqa: F401 (library names, re-exported)
from clipvip_jax.retrieval.search_command import main

if __name__ == "__main__":
  from clipvip_jax.runtime import host_allocator
  host_allocator.use_preferred()  # tcmalloc where installed: may re-execute this process, once
  sys.exit(main())
