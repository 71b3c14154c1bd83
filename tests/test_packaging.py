"""`pip install .` into a fresh virtual environment gives a package that imports and runs its commands with only
the dependencies pyproject.toml declares, and puts no top-level names into site-packages but the design card's.

Downloading the declared dependencies would take minutes and a network; instead the fresh venv sees exactly what
pip would resolve: the closure of pyproject's `dependencies` over the requirements of the distributions already
installed in this (the development) environment, exposed through one folder of links (their modules and
dist-info, nothing else), while clipvip_jax itself is really built and installed by pip (--no-deps, --no-index).
A module imported at startup but not declared fails here as it would for a user.
"""

import importlib.metadata as md
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.markers import UndefinedEnvironmentName
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
TOP_LEVEL = {"clipvip_jax", "data_pipelines"}  # the design card's packages; configs/ and tests/ stay in the checkout


def _installed() -> dict[str, md.Distribution]:
  return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions() if d.metadata["Name"]}


def _wanted(requirement: Requirement, extras: set[str]) -> bool:
  if requirement.marker is None:
    return True
  try:
    return any(requirement.marker.evaluate({"extra": e}) for e in (extras or {""}))
  except UndefinedEnvironmentName:
    return False


def dependency_closure(requirements: list[str]) -> set[str]:
  """Canonical names of the distributions pip would install for `requirements`, read from the installed ones."""
  installed, seen = _installed(), set()
  todo = [(Requirement(r), set()) for r in requirements]
  while todo:
    requirement, extras = todo.pop()
    name = canonicalize_name(requirement.name)
    if not _wanted(requirement, extras):
      continue
    assert name in installed, f"{requirement} is declared but not installed in the development environment"
    key = name + "[" + ",".join(sorted(requirement.extras)) + "]"
    if key in seen:
      continue
    seen.add(key)
    todo += [(Requirement(r), set(requirement.extras)) for r in installed[name].requires or ()]
  return {k.split("[")[0] for k in seen}


def _link_distributions(names: set[str], folder: pathlib.Path) -> None:
  """Links every top-level entry (packages, modules, .libs folders, dist-info) of the named distributions."""
  installed = _installed()
  for name in names:
    dist = installed[name]
    root = pathlib.Path(dist.locate_file(""))
    tops = {pathlib.PurePosixPath(f).parts[0] for f in dist.files or () if not str(f).startswith("..")}
    for top in tops - {"__pycache__"}:
      target = folder / top
      if (root / top).exists() and not target.exists():
        target.symlink_to(root / top)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
  """(python of a fresh venv with `pip install .` done, its site-packages, an environment without PYTHONPATH)."""
  tmp = tmp_path_factory.mktemp("fresh")
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  deps = tmp / "deps"
  deps.mkdir()
  # setuptools builds the wheel (--no-build-isolation: the fresh venv's own is used, as pip would fetch it).
  _link_distributions(dependency_closure(project["dependencies"]) | {"setuptools"}, deps)
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
  python = tmp / "venv" / "bin" / "python"
  site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     check=True, capture_output=True, text=True).stdout.strip())
  (site / "_declared_dependencies.pth").write_text(str(deps) + "\n")
  (site / "pip").symlink_to(pathlib.Path(md.distribution("pip").locate_file("pip")))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", JAX_PLATFORMS="cpu")
  # A copy of what the package is built from: setuptools builds in the source tree (build/, *.egg-info), and a
  # stale build/ in the checkout could ship files the tree no longer has.
  source = tmp / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(REPO / name, source / name)
  for name in TOP_LEVEL:
    shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
  build = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-cache-dir", str(source)], capture_output=True, text=True, env=env, cwd=tmp,
                         timeout=300)
  assert build.returncode == 0, build.stderr[-3000:]
  return python, site, env, tmp


@pytest.mark.slow
def test_installed_package_imports_and_runs_a_command_outside_the_checkout(fresh):
  python, site, env, cwd = fresh
  script = ("import clipvip_jax, data_pipelines, json; from clipvip_jax import demo; "
            "config, recipe = demo._load_demo_config('meanp'); "
            "ids, mask = clipvip_jax.tokenize(['a red square moves left']); "
            "print(json.dumps([clipvip_jax.__file__, recipe.__file__, config.model.kind, int(mask.sum())]))")
  run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  package, recipe, kind, tokens = json.loads(run.stdout.strip().splitlines()[-1])
  assert package.startswith(str(site)) and recipe.startswith(str(site)) and kind == "meanp" and tokens > 2
  helped = subprocess.run([str(python), "-m", "clipvip_jax.train", "--help"], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
  assert helped.returncode == 0 and "--workdir" in helped.stdout, helped.stderr[-3000:]
  # A checkout's recipe file through the installed package (its shared parts, the schema): a typo is refused.
  refused = subprocess.run([str(python), "-m", "clipvip_jax.train", "--config", str(REPO / "configs/tiny_test.py"),
                            "--workdir", str(cwd / "run"), "--config.optim.lerning_rate=1"], capture_output=True,
                           text=True, env=env, cwd=cwd, timeout=300)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert refused.stderr.strip().endswith("did you mean config.optim.lr?") and not (cwd / "run").exists()


@pytest.mark.slow
def test_only_the_design_cards_top_level_names_are_installed(fresh):
  _, site, _, _ = fresh
  (record,) = site.glob("clipvip_jax-*.dist-info/RECORD")
  entries = [line.split(",")[0] for line in record.read_text().splitlines() if line]
  tops = {pathlib.PurePosixPath(e).parts[0] for e in entries if not e.startswith("..")}
  assert {t for t in tops if not t.endswith(".dist-info")} == TOP_LEVEL
  for data in ("clipvip_jax/assets/bpe_simple_vocab_16e6.txt.gz", "clipvip_jax/recipes/demo.py"):
    assert data in entries, f"{data} is not installed"
  assert any(e.startswith("clipvip_jax/retrieval/static/") for e in entries)


def test_every_extra_and_dependency_is_installed_in_the_development_set():
  """The development environment (requirements.txt) holds every declared distribution, so the closure above is
  pip's, and each extra names distributions that exist."""
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  assert {"serve", "convert", "data", "export", "tpu"} <= set(extras)
  assert dependency_closure(project["dependencies"])
  for name, requirements in extras.items():
    if name not in ("tpu", "all"):  # libtpu is installed outside site-packages (make tpu)
      assert dependency_closure(requirements), name
