"""Process plumbing shared by every command, with no model code: errors as one sentence and exit 2 (cli_errors),
jax.distributed start-up and a lost process reported in one line (distributed, stderr_filter), the host allocator
the commands preload (host_allocator), and N local CPU processes for multi-host code on one machine (launch_local)."""
