"""The converter framework: reading checkpoints in every container, format detection, the CLI, rejection of
checkpoints that do not fit (named keys, exit code 2, nothing left on disk), and converted directories."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tree_state
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import torch_clip_helpers as tch
from clipvip_jax import converted_checkpoint
from clipvip_jax.convert import hf_clip
from clipvip_jax.convert.__main__ import convert_path, main as convert_main
from clipvip_jax.convert.common import ConversionError, load_state_dict
from clipvip_jax.convert.formats import convert, detect_format
from clipvip_jax.kinds import param_shapes
from clipvip_jax.models.clip import clip_config
from clipvip_jax.params import ParamMismatchError

TINY = clip_config("tiny")  # vision 64 wide / 4 heads, text 48 wide / 4 heads: heads are NOT width // 64


def _small_sd() -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(0)
  return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g),
          "c.position_ids": torch.arange(7)[None]}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]):
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    expected = v.float().numpy() if v.is_floating_point() else v.numpy()
    assert got[k].dtype == expected.dtype, k
    np.testing.assert_array_equal(got[k], expected, err_msg=k)


# ---- load_state_dict: every container ----

@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "data_parallel"])
def test_load_torch_save(tmp_path, wrap):
  sd = _small_sd()
  obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
         "data_parallel": {f"module.{k}": v for k, v in sd.items()}}[wrap]
  torch.save(obj, tmp_path / "ckpt.pt")
  _assert_same(load_state_dict(tmp_path / "ckpt.pt"), sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_cast_to_float32(tmp_path, dtype):
  sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _small_sd().items()}
  torch.save(sd, tmp_path / "half.pt")
  save_torch(sd, str(tmp_path / "half.safetensors"))
  for name in ("half.pt", "half.safetensors"):
    got = load_state_dict(tmp_path / name)
    assert got["a.weight"].dtype == np.float32 and got["c.position_ids"].dtype == np.int64
    _assert_same(got, sd)  # the exact float32 value of every half-precision number


def test_load_torchscript_archive(tmp_path):
  sd = _small_sd()
  tch.save_torchscript(sd, tmp_path / "jit.pt")
  _assert_same(load_state_dict(tmp_path / "jit.pt"), sd)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_load_hf_directory(tmp_path, weights):
  sd = {k: v for k, v in _small_sd().items()}
  if weights.endswith("safetensors"):
    save_torch(sd, str(tmp_path / weights))
  else:
    torch.save(sd, tmp_path / weights)
  (tmp_path / "config.json").write_text("{}")
  _assert_same(load_state_dict(tmp_path), sd)


def test_unreadable_inputs_name_the_file(tmp_path):
  with pytest.raises(ConversionError, match="missing.pt does not exist"):
    load_state_dict(tmp_path / "missing.pt")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="empty is a directory without model weights"):
    load_state_dict(tmp_path / "empty")
  (tmp_path / "garbage.pt").write_text("not a checkpoint")
  with pytest.raises(ConversionError, match="garbage.pt is not a readable PyTorch checkpoint"):
    load_state_dict(tmp_path / "garbage.pt")


def test_pickled_objects_need_trust(tmp_path):
  sd = _small_sd()
  torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "with_args.pt")
  with pytest.raises(ConversionError, match="with_args.pt holds Python objects.*trust_pickle"):
    load_state_dict(tmp_path / "with_args.pt")
  _assert_same(load_state_dict(tmp_path / "with_args.pt", trust_pickle=True), sd)


# ---- a tiny HF checkpoint written from our own model (no torch model needed) ----

@pytest.fixture(scope="module")
def hf_sd() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(3)
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in param_shapes("clip", TINY).items()}
  return hf_clip.from_params(flat, TINY)


def _hf_dir(path, sd, with_config=True):
  path.mkdir()
  save_numpy({k: np.require(v, np.float32, "C") for k, v in sd.items()}, str(path / "model.safetensors"),
             metadata={"format": "pt"})
  if with_config:
    (path / "config.json").write_text(json.dumps(hf_clip.config_to_hf(TINY)))
  return path


def _leftovers(directory):
  return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_detect_formats(hf_sd, fixtures_dir):
  assert detect_format(hf_sd) == "hf_clip"
  model = tch.random_clip(tch.TINY)
  assert detect_format({k: v.numpy() for k, v in tch.openai_state_dict(model).items()}) == "openai_clip"
  # The wrapped layouts contain a CLIP inside: they must win over the plain ones.
  assert detect_format(load_state_dict(fixtures_dir / "clipvip_tiny.pt")) == "clipvip"
  assert detect_format(load_state_dict(fixtures_dir / "clip2video_tiny.pt")) == "clip2video"
  with pytest.raises(ConversionError, match="in no known format.*a.weight"):
    detect_format({k: v.numpy() for k, v in _small_sd().items()}, "odd.pt")


def test_cli_converts_and_describes(hf_sd, tmp_path, capsys):
  src = _hf_dir(tmp_path / "hf", hf_sd)
  assert convert_main([str(src), "--out", str(tmp_path / "out")]) == 0
  line = capsys.readouterr().out.strip()
  assert "kind clip" in line and "vision 64w/2L/4h" in line and "text 48w/2L/4h" in line
  n_params = sum(v.size for v in hf_sd.values())
  assert f"{n_params:,} params" in line
  loaded = converted_checkpoint.load_converted(tmp_path / "out")
  assert loaded.kind == "clip" and loaded.config == TINY and loaded.source_format == "hf_clip"
  for key, value in hf_clip.to_params(hf_sd, TINY).items():
    np.testing.assert_array_equal(loaded.params[key], value, err_msg=key)
  assert _leftovers(tmp_path) == []


def test_config_supplies_head_counts(hf_sd, tmp_path):
  """Heads are not in the weights: an HF dir without config.json gets width // 64; --config gives the truth."""
  src = _hf_dir(tmp_path / "bare", hf_sd, with_config=False)
  guessed = convert_path(src, tmp_path / "guessed")
  assert (guessed.config.vision.heads, guessed.config.text.heads) == (1, 1)
  (tmp_path / "config.json").write_text(json.dumps({"clip_config": hf_clip.config_to_hf(TINY)}))
  given = convert_path(src, tmp_path / "given", config=tmp_path / "config.json")
  assert given.config == TINY


def _broken(sd, defect):
  sd = dict(sd)
  if defect == "missing":
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    return sd, "text_model.encoder.layers.1.mlp.fc2.bias"
  if defect == "unexpected":
    sd["text_model.encoder.extra_gate.weight"] = np.zeros((4,), np.float32)
    return sd, "text_model.encoder.extra_gate.weight"
  sd["vision_model.encoder.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 60), np.float32)
  return sd, "vision_model.encoder.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize("defect", ["missing", "unexpected", "wrong_shape"])
def test_rejects_checkpoint_that_does_not_fit(hf_sd, tmp_path, capsys, defect):
  sd, key = _broken(hf_sd, defect)
  src = _hf_dir(tmp_path / "hf", sd)
  out = tmp_path / "out"
  with pytest.raises(ParamMismatchError, match=key.replace(".", r"\.")):
    convert_path(src, out)
  assert not out.exists() and _leftovers(tmp_path) == []
  assert convert_main([str(src), "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert key in err and "Traceback" not in err
  assert not out.exists() and _leftovers(tmp_path) == []


def test_cli_process_exit_code_and_message(hf_sd, tmp_path):
  """The real entry point: exit status 2, the key named on stderr, no traceback, no output directory."""
  sd, key = _broken(hf_sd, "missing")
  src = _hf_dir(tmp_path / "hf", sd)
  proc = subprocess.run([sys.executable, "-m", "clipvip_jax.convert", str(src), "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  assert key in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_cli_input_errors(hf_sd, tmp_path, capsys):
  src = _hf_dir(tmp_path / "hf", hf_sd)
  assert convert_main([str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "o1")]) == 2
  assert "nowhere.pt does not exist" in capsys.readouterr().err
  # Forcing a layout the file is not in: its converter reports the keys it cannot find.
  assert convert_main([str(src), "--out", str(tmp_path / "o2"), "--format", "openai_clip"]) == 2
  assert "visual" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    convert_main([str(src), "--out", str(tmp_path / "o3"), "--format", "tensorflow"])
  assert e.value.code == 2
  assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3")) and _leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_forced(hf_sd, tmp_path, capsys):
  src = _hf_dir(tmp_path / "hf", hf_sd)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert convert_main([str(src), "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
  assert convert_main([str(src), "--out", str(out), "--force"]) == 0
  assert not (out / "keep.txt").exists() and converted_checkpoint.is_converted_dir(out)
  assert _leftovers(tmp_path) == []


def test_a_finished_conversion_run_again_is_complete_and_writes_nothing(hf_sd, tmp_path, capsys):
  """A scheduler relaunching a conversion that had in fact finished: exit 0, 'complete', the output untouched; other
  arguments, or a source changed since, are still refused."""
  src = _hf_dir(tmp_path / "hf", hf_sd)
  out = tmp_path / "out"
  assert convert_main([str(src), "--out", str(out)]) == 0
  capsys.readouterr()
  before = tree_state(out)
  assert convert_main([str(src), "--out", str(out)]) == 0
  assert capsys.readouterr().out.strip() == (f"{out} is complete: converted earlier from {src} with the same "
                                             "arguments; nothing to do")
  assert tree_state(out) == before and _leftovers(tmp_path) == []
  assert convert_main([str(src), "--out", str(out), "--format", "openai_clip"]) == 2
  assert "already exists" in capsys.readouterr().err
  weights = next(p for p in src.iterdir() if p.name != "config.json")
  os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
  assert convert_main([str(src), "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err and tree_state(out) == before


def test_failed_write_leaves_nothing(hf_sd, tmp_path, monkeypatch):
  """A failure while writing (disk full, a bug) removes the half-built directory and still raises."""
  src = _hf_dir(tmp_path / "hf", hf_sd)

  def broken_save(flat, directory):
    os.makedirs(directory)
    raise OSError("disk full")

  monkeypatch.setattr(converted_checkpoint, "save_params", broken_save)
  with pytest.raises(OSError, match="disk full"):
    convert_path(src, tmp_path / "out")
  assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_converted_dir_round_trip(hf_sd, tmp_path):
  converted = convert(hf_sd, hf_clip.config_to_hf(TINY), source="memory")
  converted_checkpoint.save_converted(converted, tmp_path / "c")
  meta = json.loads((tmp_path / "c" / "config.json").read_text())
  assert meta["format_version"] == 1 and meta["kind"] == "clip" and meta["source_format"] == "hf_clip"
  back = converted_checkpoint.load_converted(tmp_path / "c")
  assert back.config == converted.config and sorted(back.params) == sorted(converted.params)
  for k, v in converted.params.items():
    assert back.params[k].dtype == np.float32
    np.testing.assert_array_equal(back.params[k], v, err_msg=k)


def test_load_converted_rejects_foreign_dirs(tmp_path):
  with pytest.raises(ConversionError, match="no config.json"):
    converted_checkpoint.load_converted(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(ConversionError, match="format_version"):
    converted_checkpoint.load_converted(tmp_path)
