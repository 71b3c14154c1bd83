"""The one checkpoint loader: `load_checkpoint(path)` -> a `Loaded` (kind, config, flat float32 params, ...).

Training init (config.init.checkpoint), eval, encode, search, serve, export and the public API
(`clipvip_jax.load_pretrained`) all read checkpoints through it. SOURCES is the table of what a path can be; the
first entry that matches reads it:

  converted  DIR/config.json (with format_version) + DIR/params/: converted_checkpoint.load_converted
  workdir    DIR/checkpoints/<step>/ of a training run: train.checkpoint; `step` = a number, "latest" (default)
             or "best" (best.json); also gives the run config the step was saved with
  hf_dir     an HF model directory (config.json + model.safetensors or pytorch_model.bin), converted on the fly
             with its own config.json (or `config`); its tokenizer files, when present, are the model's
  file       an original PyTorch, TorchScript or safetensors file, converted on the fly

Converted directories and workdirs carry their model config: a `config` for them is refused, as is a `step` for
anything but a workdir and a `format` for anything but an original. The originals' state-dict layouts (OpenAI
CLIP, HF CLIP, CLIP-ViP, CLIP2Video) are detected from their keys, one converter module per layout in
convert.formats.FORMATS (`format` forces one). A new on-disk form is one entry in SOURCES; a new PyTorch layout is
one converter module and its entry in FORMATS.

Every failure is one sentence naming the path (a ValueError or OSError; CheckpointError for what this module
finds), so commands report it with exit status 2; CLIPVIP_DEBUG=1 keeps the traceback of an unexpected one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Mapping

from clipvip_jax.convert.common import Converted

PathLike = str | os.PathLike


class CheckpointError(ValueError):
  """A path that holds no checkpoint this project can read, or options that do not apply to it; one sentence."""


@dataclasses.dataclass
class Loaded(Converted):
  """A checkpoint read from disk: what `Converted` holds, plus where it came from."""
  path: str = ""  # the path it was read from (`source` is where a converted checkpoint was converted from)
  origin: str = ""  # the SOURCES entry that read it
  step: int | None = None  # the training step of a workdir checkpoint
  run_config: dict[str, Any] | None = None  # the run config a workdir step was saved with
  tokenizer_dir: pathlib.Path | None = None  # an HF directory's own tokenizer files


@dataclasses.dataclass(frozen=True)
class _Request:
  config: Any  # the original's config (dict or JSON path) or None
  step: int | str | None
  format: str | None
  trust_pickle: bool


def _is_converted(path: pathlib.Path) -> bool:
  from clipvip_jax import converted_checkpoint
  return converted_checkpoint.is_converted_dir(path)


def _is_workdir(path: pathlib.Path) -> bool:
  from clipvip_jax.train import checkpoint as ckpt_lib
  return (path / ckpt_lib.CHECKPOINT_DIR).is_dir()


def _is_hf_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and (path / "config.json").is_file()


def _read_converted(path: pathlib.Path, req: _Request) -> Loaded:
  from clipvip_jax import converted_checkpoint
  c = converted_checkpoint.load_converted(path)
  return Loaded(c.kind, c.config, c.params, c.source, c.source_format)


def _read_workdir(path: pathlib.Path, req: _Request) -> Loaded:
  from clipvip_jax.train import checkpoint as ckpt_lib
  if not ckpt_lib.finished_steps(path / ckpt_lib.CHECKPOINT_DIR):
    raise CheckpointError(f"{path} is a training workdir without a finished checkpoint yet")
  step_dir = ckpt_lib.resolve_step(path, req.step)
  kind, cfg, params = ckpt_lib.read_step_params(step_dir)
  return Loaded(kind, cfg, params, str(path), "workdir", step=int(step_dir.name),
                run_config=_read_json(step_dir / "config" / "metadata"))


def _read_original(path: pathlib.Path, req: _Request) -> Loaded:
  from clipvip_jax.convert.common import load_state_dict, source_config
  from clipvip_jax.convert.formats import convert
  config = source_config(path, req.config)  # before the (possibly long) read: a missing config file fails first
  c = convert(load_state_dict(path, trust_pickle=req.trust_pickle), config, source=str(path), format=req.format)
  return Loaded(c.kind, c.config, c.params, c.source, c.source_format, tokenizer_dir=_tokenizer_dir(path))


@dataclasses.dataclass(frozen=True)
class Source:
  """One form a checkpoint path can take."""
  name: str
  matches: Callable[[pathlib.Path], bool]
  read: Callable[[pathlib.Path, _Request], Loaded]
  carries_config: bool  # holds its own model config: a `config` argument is refused
  has_steps: bool = False  # `step` applies


SOURCES: tuple[Source, ...] = (
    Source("converted", _is_converted, _read_converted, carries_config=True),
    Source("workdir", _is_workdir, _read_workdir, carries_config=True, has_steps=True),
    Source("hf_dir", _is_hf_dir, _read_original, carries_config=False),
    Source("file", pathlib.Path.is_file, _read_original, carries_config=False),
)


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  """The JSON object at `path`, or None when it is missing or unreadable: a step's run config only refines the
  recipe (retrieval.model), whose defaults then apply."""
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None


def _tokenizer_dir(path: pathlib.Path) -> pathlib.Path | None:
  """An HF directory's own tokenizer files, when it ships them."""
  if path.is_dir() and (((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
                        or (path / "tokenizer.json").is_file()):
    return path
  return None


def _config_argument(config: Any) -> Any:
  """None for "no config" in any of its spellings (None, "", {}, an empty ConfigDict), else a dict or a path."""
  if config is None or isinstance(config, (str, os.PathLike)):
    return str(config) if config else None
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  if isinstance(config, Mapping):
    return dict(config) if config else None
  return config


def source_of(path: pathlib.Path) -> Source:
  """The SOURCES entry that reads `path`; CheckpointError when none does."""
  if not path.exists():
    raise CheckpointError(f"checkpoint {path} does not exist")
  for source in SOURCES:
    if source.matches(path):
      return source
  raise CheckpointError(f"{path} is neither a converted checkpoint (config.json + params/), a training workdir "
                        "(checkpoints/<step>/), an HF model directory (config.json + weights) nor a checkpoint file")


def _check_options(path: pathlib.Path, source: Source, req: _Request) -> None:
  if source.carries_config and req.config is not None:
    raise CheckpointError(f"a config applies to original checkpoint files; {path} already carries its model config")
  if not source.has_steps and req.step not in (None, "latest"):
    raise CheckpointError(f"a step applies to training workdirs; {path} is not one (no checkpoints/<step>/ folder)")
  if source.carries_config and req.format is not None:
    raise CheckpointError(f"a format applies to original checkpoint files; {path} is a {source.name} checkpoint")


def load_checkpoint(path: PathLike, config: Mapping[str, Any] | PathLike | None = None, *,
                    step: int | str | None = None, format: str | None = None,
                    trust_pickle: bool = False) -> Loaded:
  """The checkpoint at `path`, whatever its form (module doc), with float32 numpy parameters on the host.

  config: the original's config (dict or JSON path: an HF CLIPConfig dict, possibly under "clip_config", or
  CLIP2Video's options) for what an original's weights do not determine, such as head counts. step: for a
  workdir, a step number, "latest" (default) or "best". format: force an original's layout
  (convert.formats.FORMATS). trust_pickle: allow full unpickling of a file holding Python objects besides tensors.
  """
  path = pathlib.Path(path).expanduser()
  source = source_of(path)
  config = _config_argument(config)
  if isinstance(config, str) and not pathlib.Path(config).is_file():
    raise CheckpointError(f"config file {config} does not exist")
  req = _Request(config, step, format, trust_pickle)
  _check_options(path, source, req)
  try:
    return dataclasses.replace(source.read(path, req), path=str(path), origin=source.name)
  except (ValueError, OSError):
    raise  # already one sentence (ConversionError, ParamMismatchError, DamagedCheckpointError, FileNotFoundError)
  except Exception as e:  # noqa: BLE001 — an unreadable checkpoint of any kind is an input error
    from clipvip_jax.runtime.cli_errors import DEBUG_ENV
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
      raise
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {first_line})") from e
