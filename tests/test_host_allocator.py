"""The commands' host allocator (clipvip_jax/runtime/host_allocator.py): which library, when a process re-executes, and
that a command really runs with it afterwards."""

import os
import subprocess
import sys

import pytest

from clipvip_jax.runtime import host_allocator


def _lib(folder, name):
  path = folder / name
  path.write_bytes(b"\x7fELF")
  return path


def test_find_prefers_tcmalloc_then_jemalloc(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  assert host_allocator.find([str(a), str(b)]) is None
  jemalloc = _lib(a, "libjemalloc.so.2")
  assert host_allocator.find([str(a), str(b)]) == str(jemalloc)
  _lib(b, "libtcmalloc_minimal.so.4.5.10")
  tcmalloc = _lib(b, "libtcmalloc_minimal.so.4")
  os.symlink(tmp_path / "missing", b / "libtcmalloc_minimal.so")  # a dangling development link is not a library
  assert host_allocator.find([str(a), str(b)]) == str(tcmalloc)


def test_plan_preloads_once_and_respects_the_user(tmp_path):
  tcmalloc = _lib(tmp_path, "libtcmalloc_minimal.so.4")
  dirs = [str(tmp_path)]
  env = host_allocator.plan({"LD_PRELOAD": "/opt/other.so"}, dirs)
  assert env["LD_PRELOAD"] == f"{tcmalloc} /opt/other.so"
  assert env[host_allocator.CHOSEN_ENV] == str(tcmalloc) and "MALLOC_CONF" not in env
  assert host_allocator.plan(env, dirs) is None  # the re-executed process does not go again
  assert host_allocator.plan({host_allocator.ENV: "system"}, dirs) is None
  assert host_allocator.plan({"LD_PRELOAD": "/x/libjemalloc.so.2"}, dirs) is None  # the user chose one already
  assert host_allocator.plan({}, [str(tmp_path / "nowhere")]) is None  # none installed: run as started
  jemalloc = _lib(tmp_path, "libjemalloc.so.2")
  env = host_allocator.plan({host_allocator.ENV: str(jemalloc)}, dirs)
  assert env["LD_PRELOAD"] == str(jemalloc) and env["MALLOC_CONF"] == host_allocator.JEMALLOC_CONF
  with pytest.raises(SystemExit, match="CLIPVIP_HOST_ALLOCATOR='/no/such.so': no such file"):
    host_allocator.plan({host_allocator.ENV: "/no/such.so"}, dirs)


_PROBE = ("from clipvip_jax.runtime import host_allocator; host_allocator.use_preferred(); import sys; "
          "print(sys.argv[1:], host_allocator.describe()); "
          "print('\\n'.join(l for l in open('/proc/self/maps') if 'malloc' in l))")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc/self/maps are Linux's")
def test_a_command_reexecutes_itself_with_tcmalloc_loaded():
  library = host_allocator.find()
  if library is None:
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail("no tcmalloc/jemalloc installed: .ci/run (make install as root) installs libtcmalloc-minimal4")
    pytest.skip("no tcmalloc/jemalloc installed here (apt-get install libtcmalloc-minimal4)")
  env = {k: v for k, v in os.environ.items() if k not in (host_allocator.CHOSEN_ENV, "LD_PRELOAD")}
  env.pop(host_allocator.ENV, None)
  out = subprocess.run([sys.executable, "-c", _PROBE, "--config.x=1", "two words"], env=env, capture_output=True,
                       text=True, check=True).stdout
  first, maps = out.split("\n", 1)
  assert first.startswith("['--config.x=1', 'two words'] host allocator " + os.path.basename(library)), out
  assert os.path.realpath(library) in maps  # the library is mapped: malloc is tcmalloc's
  env[host_allocator.ENV] = "system"
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True).stdout
  assert "host allocator glibc malloc" in out and os.path.realpath(library) not in out
