"""What every converter shares: reading a PyTorch/safetensors checkpoint into numpy, and the `Converted` result.

Checkpoints come in many wrappers: a bare state dict, `{"state_dict": ...}` or `{"model": ...}` around one,
OpenAI's TorchScript archives, safetensors files, HF directories. All become one flat {name: np.ndarray} dict,
floating tensors cast to float32 (released checkpoints are often float16 or bfloat16; our models keep float32
parameters), integer buffers (position_ids) left as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

PathLike = str | os.PathLike


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the file, key or field at fault."""


@dataclasses.dataclass
class Converted:
  """A checkpoint in our terms: the model kind ("clip", "clipvip", "clip2video"), its config object, and its
  parameters as a flat {"a/b/c": float32 np.ndarray} dict keyed like `clipvip_jax.params.flat_params`."""
  kind: str
  config: Any
  params: dict[str, np.ndarray]
  source: str = ""
  source_format: str = ""

  @property
  def num_params(self) -> int:
    return int(sum(np.size(v) for v in self.params.values()))


# Files an HF model directory may hold its weights in, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")

# Wrapper keys training scripts put around a state dict ({"state_dict": sd, "epoch": 3}, {"model": sd}, ...).
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def hf_weights_file(directory: PathLike) -> pathlib.Path:
  """The weights file of an HF model directory; ConversionError naming the directory when it has none."""
  directory = pathlib.Path(directory)
  for name in HF_WEIGHT_FILES:
    if (directory / name).is_file():
      return directory / name
  raise ConversionError(f"{directory} is a directory without model weights (expected one of {', '.join(HF_WEIGHT_FILES)})")


def _to_numpy(value, key: str, path: PathLike) -> np.ndarray:
  import torch
  if not isinstance(value, torch.Tensor):
    raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
  value = value.detach().cpu()
  if value.is_floating_point():
    value = value.to(torch.float32)
  return value.contiguous().numpy().copy()


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_torchscript(path: pathlib.Path) -> bool:
  # A TorchScript archive is a zip holding the module's code and constants; torch.save zips hold only data.pkl.
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _is_pickle_container(path: pathlib.Path) -> bool:
  # torch.save writes a zip (since 1.6) or, in the legacy format, a pickle stream, whose first byte is PROTO 0x80.
  with open(path, "rb") as f:
    return zipfile.is_zipfile(path) or f.read(1) == b"\x80"


def _unwrap(obj: Any, path: PathLike) -> Mapping[str, Any]:
  import torch
  while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if isinstance(obj, torch.nn.Module):
    obj = obj.state_dict()
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
  return obj


def _torch_load(path: pathlib.Path, trust_pickle: bool) -> Mapping[str, Any]:
  import torch
  if _is_torchscript(path):
    # OpenAI's released CLIP .pt files are TorchScript archives; their parameters are the state dict.
    try:
      return torch.jit.load(str(path), map_location="cpu").state_dict()
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:  # a zip with code/ but no model
      raise ConversionError(f"{path} looks like a TorchScript archive but does not load as one "
                            f"({_first_line(e).split('  (Could this')[0]})") from None
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "Weights only load failed" not in str(e) or not _is_pickle_container(path):
      raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
    if not trust_pickle:
      raise ConversionError(
          f"{path} holds Python objects besides tensors, which are only loaded from trusted files; "
          f"if you trust it, convert it once (python -m clipvip_jax.convert {path} --out DIR --trust-pickle) and "
          "use DIR, or pass trust_pickle=True") from None
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
  except (RuntimeError, EOFError, KeyError, ValueError) as e:  # what torch raises for truncated or foreign files
    raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
  return _unwrap(obj, path)


def _safetensors_load(path: pathlib.Path) -> Mapping[str, Any]:
  from safetensors import SafetensorError
  from safetensors.torch import load_file
  try:
    return load_file(str(path), device="cpu")  # through torch: numpy has no bfloat16
  except SafetensorError as e:
    raise ConversionError(f"{path} is not a readable safetensors file ({e})") from None


def _sharded_load(index_path: pathlib.Path, trust_pickle: bool) -> dict[str, Any]:
  try:
    weight_map = json.loads(index_path.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{index_path} is not a sharded-checkpoint index with a 'weight_map' ({e})") from None
  out: dict[str, Any] = {}
  for shard in sorted(set(weight_map.values())):
    out.update(_load_file(index_path.parent / shard, trust_pickle))
  return out


def _load_file(path: pathlib.Path, trust_pickle: bool) -> Mapping[str, Any]:
  if not path.is_file():
    raise ConversionError(f"checkpoint file {path} does not exist")
  if path.name.endswith(".index.json"):
    return _sharded_load(path, trust_pickle)
  if path.suffix == ".safetensors":
    return _safetensors_load(path)
  return _torch_load(path, trust_pickle)


def load_state_dict(path: PathLike, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """{name: np.ndarray} of a checkpoint file or HF model directory; floating tensors as float32.

  Reads plain or wrapped (`state_dict`/`model`) torch.save files with `weights_only=True` (full unpickling only
  with `trust_pickle`), TorchScript archives, safetensors files, sharded `*.index.json` checkpoints and HF
  directories (model.safetensors or pytorch_model.bin). A uniform `module.` prefix (DataParallel) is removed.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ConversionError(f"checkpoint {path} does not exist")
  raw = _load_file(hf_weights_file(path) if path.is_dir() else path, trust_pickle)
  sd = {str(k): _to_numpy(v, str(k), path) for k, v in raw.items()}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def read_config(config: Mapping[str, Any] | PathLike | None) -> dict[str, Any] | None:
  """A config given as a dict or as the path of a JSON file -> dict (None stays None)."""
  if config is None or isinstance(config, Mapping):
    return None if config is None else dict(config)
  path = pathlib.Path(config)
  if not path.is_file():
    raise ConversionError(f"config file {path} does not exist")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"config file {path} is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ConversionError(f"config file {path} holds a JSON {type(data).__name__}, not an object")
  return data


def source_config(src: PathLike, config: Mapping[str, Any] | PathLike | None) -> dict[str, Any] | None:
  """The config to convert `src` with: the user's (dict or JSON path), else an HF directory's own config.json."""
  src = pathlib.Path(src)
  if config is None and src.is_dir() and (src / "config.json").is_file():
    config = src / "config.json"
  return read_config(config)
