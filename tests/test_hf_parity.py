"""Parity with transformers' PyTorch CLIPModel (random weights), through every way a checkpoint reaches
`load_pretrained`: an HF directory (safetensors or pytorch_model.bin), a converted directory, and the OpenAI layout
(plain state dict and TorchScript archive). Plus the reverse export, which must give back identical arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import torch_clip_helpers as tch
from clipvip_jax import load_pretrained
from clipvip_jax.convert.__main__ import main as convert_main
from clipvip_jax.convert.export_hf import export_hf

TOL = 1e-4  # the bound: max abs error of L2-normalised embeddings in float32 on CPU


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random CLIPModel, its reference embeddings, and the same weights in every on-disk layout."""
  root = tmp_path_factory.mktemp("tiny_clip")
  model = tch.random_clip(tch.TINY, seed=1)
  images, ids, mask = tch.inputs(tch.TINY)
  ref = tch.torch_embeddings(model, images, ids, mask)
  model.save_pretrained(root / "hf_safetensors")
  tch.save_bin_dir(model, root / "hf_bin")
  assert convert_main([str(root / "hf_safetensors"), "--out", str(root / "converted")]) == 0
  openai = tch.openai_state_dict(model)
  torch.save(openai, root / "openai_state_dict.pt")
  v, t = tch.TINY["vision"], tch.TINY["text"]
  # OpenAI's archives carry these integer attributes beside the weights; converters must ignore them.
  tch.save_torchscript(openai, root / "openai_jit.pt", extra_buffers={
      "input_resolution": torch.tensor(v["image_size"]), "context_length": torch.tensor(t["max_position_embeddings"]),
      "vocab_size": torch.tensor(t["vocab_size"])})
  return {"root": root, "model": model, "inputs": (images, ids, mask), "ref": ref}


def _max_errors(path, images, ids, mask, ref):
  m = load_pretrained(path)
  img, txt = np.asarray(m.encode_image(images)), np.asarray(m.encode_text(ids, mask))
  return float(np.abs(img - ref[0]).max()), float(np.abs(txt - ref[1]).max()), m


@pytest.mark.parametrize("layout", ["hf_safetensors", "hf_bin", "converted", "openai_state_dict.pt", "openai_jit.pt"])
def test_tiny_parity(tiny, layout):
  err_img, err_txt, m = _max_errors(tiny["root"] / layout, *tiny["inputs"], tiny["ref"])
  assert m.kind == "clip"
  assert err_img <= TOL and err_txt <= TOL, (layout, err_img, err_txt)


def test_export_round_trip_is_bit_exact(tiny, tmp_path):
  out = export_hf(tiny["root"] / "converted", tmp_path / "exported")
  original = load_file(str(tiny["root"] / "hf_safetensors" / "model.safetensors"))
  exported = load_file(str(out / "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert np.array_equal(exported[key], value), key


def test_exported_dir_loads_in_transformers(tiny, tmp_path):
  """CLIPModel.from_pretrained(exported) computes what the original model computes."""
  out = export_hf(tiny["root"] / "converted", tmp_path / "exported")
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  got = tch.torch_embeddings(reloaded, *tiny["inputs"])
  for a, b in zip(got, tiny["ref"]):
    np.testing.assert_array_equal(a, b)


def test_export_cli_refuses_to_overwrite(tiny, tmp_path, capsys):
  from clipvip_jax.convert.export_hf import main as export_main
  out = tmp_path / "exported"
  assert export_main([str(tiny["root"] / "converted"), "--out", str(out)]) == 0
  assert export_main([str(tiny["root"] / "converted"), "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert export_main([str(tiny["root"] / "converted"), "--out", str(out), "--force"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["B/32", "B/16"])
def test_real_architecture_parity(arch, tmp_path):
  """The real ViT-B/32 and B/16 CLIP shapes (random weights): one image, one text, through save_pretrained."""
  spec = {"B/32": tch.B32, "B/16": tch.B16}[arch]
  model = tch.random_clip(spec, seed=2)
  images, ids, mask = tch.inputs(spec, n_images=1)
  ids, mask = ids[:1], mask[:1]
  ref = tch.torch_embeddings(model, images, ids, mask)
  model.save_pretrained(tmp_path / "hf")
  del model
  err_img, err_txt, m = _max_errors(tmp_path / "hf", images, ids, mask, ref)
  assert m.config.vision.patch_size == spec["vision"]["patch_size"] and m.config.text.heads == 8
  assert err_img <= TOL and err_txt <= TOL, (arch, err_img, err_txt)


def test_clipvip_export_round_trip(fixtures_dir, tmp_path):
  """A released-layout CLIP-ViP file -> converted -> exported: the same `clipmodel.` tensors, bit for bit, and a
  config.json that loads back to the same model config."""
  from clipvip_jax.converted_checkpoint import load_converted
  from clipvip_jax.convert.common import load_state_dict
  src = fixtures_dir / "clipvip_tiny.pt"
  assert convert_main([str(src), "--out", str(tmp_path / "converted"),
                       "--config", str(fixtures_dir / "clipvip_tiny_config.json")]) == 0
  out = export_hf(tmp_path / "converted", tmp_path / "exported")
  original = {k: v for k, v in load_state_dict(src).items() if not k.endswith("position_ids")}
  exported = load_file(str(out / "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert np.array_equal(exported[key], value) and exported[key].shape == value.shape, key
  reloaded = load_pretrained(out)
  assert reloaded.kind == "clipvip" and reloaded.config == load_converted(tmp_path / "converted").config
