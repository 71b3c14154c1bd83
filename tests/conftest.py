"""Shared test helpers: where the parity fixtures live, and the rule that CI never skips them."""

import os
import pathlib
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]

# The suite is compile-bound: XLA:CPU spends most of a test in LLVM's optimisation passes, for programs that then
# run a few steps at toy sizes. The tests check what the programs compute, not how fast they run, so they compile
# with most optimisations off (jax_disable_most_optimizations: about half the CPU time of a compile; the HLO, and
# hence memory and FLOP counts, are unchanged). Set in the environment, before jax reads it, so the processes the
# tests start inherit it; JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off. A module whose checks hold for the
# optimised program only uses the `fully_optimised` fixture below.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's MLIR fusion emitters compile every fusion on a thread pool of its own: the suite's compiles cost about
# twice the CPU time they do with the older emitters (CLIP2Video's parity step: 16-19 -> 7.5-9 CPU s; the
# suite runs one test process per core, so CPU time is its wall time). What the programs compute does not change
# (every parity test passes at its tolerance). Set in XLA_FLAGS before any backend starts, so the commands the
# tests start (launch_local keeps other flags) inherit it too.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
# Where the suite has a persistent compilation cache (JAX_COMPILATION_CACHE_DIR, `make test`), every program goes
# into it, not only those that took a second to compile: the test processes, and the commands they start, build
# the same small programs again and again (a repeated tiny training command: 25 -> 19 CPU s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "jax" in sys.modules:  # a plugin imported jax before this file: it has read its flags already
  _jax = sys.modules["jax"]
  _jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")
  _jax.config.update("jax_persistent_cache_min_compile_time_secs",
                     float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def _fixtures_path() -> pathlib.Path:
  return pathlib.Path(os.environ.get("CLIPVIP_FIXTURES", _REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """The folder of original-implementation fixtures. Missing: skip locally, fail under CI=true."""
  path = _fixtures_path()
  if not path.is_dir():
    msg = f"parity fixtures not found at {path} (set CLIPVIP_FIXTURES)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg + "; CI must run the parity tests")
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def shared_data_dir(fixtures_dir) -> pathlib.Path:
  """../shared/data (real annotation files), found beside the fixtures folder."""
  path = fixtures_dir.parent / "data"
  if not path.is_dir():
    path = _REPO.parent / "shared" / "data"
  if not path.is_dir():
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(f"shared data not found at {path}")
    pytest.skip(f"shared data not found at {path}")
  return path


# The environment of a command a `fully_optimised` module starts.
FULLY_OPTIMISED_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}


@pytest.fixture(scope="module")
def fully_optimised():
  """Every XLA optimisation on for a module's compiles (the suite turns most off, above): the planner's TPU and
  GPU facts must be those of the program a run would get; some identities hold bit for bit only once XLA:CPU has
  optimised both programs (an all-valid mask and no mask)."""
  import jax
  was = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", was)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for a module's training runs (processes they start share it through
  config.compilation_cache_dir): the suite's own where it has one (JAX_COMPILATION_CACHE_DIR, `make test`), so
  that the tiny model's steps compiled by one test file or process are loaded by the others; else one for the
  module. The process's own cache setting is restored after the module."""
  import jax
  previous = jax.config.jax_compilation_cache_dir  # the suite's shared cache (Makefile), if any
  yield pathlib.Path(previous) if previous else tmp_path_factory.mktemp("jax_cache")
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_compilation_cache_dir", previous)
  compilation_cache.reset_cache()


def synthetic_shards(tmp_path_factory, **kwargs) -> pathlib.Path:
  """A synthetic twin-clip shard set (data_pipelines.synthetic.generate with 4 frames of 32 x 32 by default)."""
  from data_pipelines import synthetic
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(out), **{"frames": 4, "size": 32, **kwargs})
  return out


def tree_state(root: pathlib.Path) -> dict[str, tuple[bytes, int]]:
  """{relative path: (bytes, mtime_ns)} of every file under `root`: equal before and after a command that must
  leave its output untouched (a relaunched finished build or conversion)."""
  return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _sigint_left_as_found(request):
  """A test that leaves this process's SIGINT ignored makes every command the later tests start inherit it (an
  ignored signal survives exec), so their Ctrl-C tests would see nothing: restore it, and say which test did it."""
  import signal
  import warnings
  before = signal.getsignal(signal.SIGINT)
  yield
  if before is not signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)
    warnings.warn(f"{request.node.nodeid} left SIGINT ignored (restored)")
