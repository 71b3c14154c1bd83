"""Shared test helpers: where the parity fixtures live, and the rule that CI never skips them."""

import os
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


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
