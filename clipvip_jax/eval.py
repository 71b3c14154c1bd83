"""`python -m clipvip_jax.eval --checkpoint WORKDIR|DIR|FILE [--config configs/X.py] [--split test]`.

Retrieval metrics (t2v and v2t R@1/5/10, MdR, MnR, with and without dual softmax) written as JSON; the
evaluation itself lives in clipvip_jax/train/evaluator.py, the command line in clipvip_jax/train/cli.py.
"""

import sys

from clipvip_jax.train.cli import eval_main

if __name__ == "__main__":
  from clipvip_jax.runtime import host_allocator
  host_allocator.use_preferred()  # tcmalloc where installed: may re-execute this process, once
  from clipvip_jax.runtime import distributed
  sys.exit(distributed.finish(eval_main()))
