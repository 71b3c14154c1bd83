"""Tiny checkpoints and videos for the encode/search tests (fast to make: no random-init tracing, no training)."""

from __future__ import annotations

import dataclasses
import pathlib

import av
import numpy as np
import pytest

from clipvip_jax import converted_checkpoint, kinds
from clipvip_jax.convert.common import Converted
from clipvip_jax.models import clip, clip2video, clipvip


def tiny_clipvip_config(projection_dim: int = 32) -> clipvip.CLIPViPConfig:
  """The "tiny" CLIP (32 px frames, patch 8, 16 text positions, CLIP's vocabulary) with 2 proxies, T0 = 4."""
  base = clip.clip_config("tiny")
  return clipvip.CLIPViPConfig(clip=dataclasses.replace(base, projection_dim=projection_dim), num_proxies=2,
                               temporal_size=4)


def random_params(kind: str, cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """Every parameter the model has, drawn from numpy: LayerNorm gains 1, biases 0, weights N(0, 0.05),
  logit_scale 4.6. (Tracing the model's own initialisers costs far longer than a test should.)"""
  rng = np.random.default_rng(seed)

  def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key == "logit_scale":
      return np.full(shape, 4.6, np.float32)
    if key.endswith("/scale"):
      return np.ones(shape, np.float32)
    if key.endswith("/bias"):
      return np.zeros(shape, np.float32)
    return rng.normal(0.0, 0.05, shape).astype(np.float32)

  return {k: value(k, s) for k, s in kinds.param_shapes(kind, cfg).items()}


def write_tiny_clipvip(path: pathlib.Path, projection_dim: int = 32, seed: int = 0) -> pathlib.Path:
  """A converted CLIP-ViP directory (config.json + Orbax params) with random weights."""
  cfg = tiny_clipvip_config(projection_dim)
  converted = Converted("clipvip", cfg, random_params("clipvip", cfg, seed), source="random")
  return converted_checkpoint.save_converted(converted, path)


def write_tiny_clip2video(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A converted CLIP2Video directory (TDB + TAB, 3 centres, 6 frames) around the tiny CLIP, random weights."""
  cfg = clip2video.CLIP2VideoConfig.for_clip(clip.clip_config("tiny"), center_k=3, temporal_layers=1, num_frames=6)
  converted = Converted("clip2video", cfg, random_params("clip2video", cfg, seed), source="random")
  return converted_checkpoint.save_converted(converted, path)


def write_video(path: pathlib.Path, frames: int = 8, size: int = 32, seed: int = 0) -> None:
  """An H.264 mp4 of `frames` random-coloured frames at 4 fps."""
  rng = np.random.default_rng(seed)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=4)
    stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
    for _ in range(frames):
      pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
      for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


# Module-scoped fixtures of the retrieval test files (import them into a test module to use them): a tiny random
# CLIP-ViP written as a converted checkpoint, its loaded model, and 20 synthetic clips.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
  return write_tiny_clipvip(tmp_path_factory.mktemp("ckpt") / "clipvip")


@pytest.fixture(scope="module")
def model(checkpoint):  # pylint: disable=redefined-outer-name
  from clipvip_jax.retrieval.model import load_model
  return load_model(checkpoint)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
  from data_pipelines import synthetic
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(out), 20, seed=0)
  return out


def write_caption_index(model, checkpoint: pathlib.Path, shards: pathlib.Path, out: pathlib.Path,
                        part_rows: int = 5) -> pathlib.Path:
  """An index of the synthetic shards' train split (16 clips) whose rows are the model's own text embeddings of each
  clip's first caption, so that typing a caption finds its clip first whatever the random weights; with its
  thumbnails. For the service's tests (the page and the API are under test, not the model)."""
  from clipvip_jax.retrieval import thumbnails
  from clipvip_jax.retrieval.index import write_index
  from data_pipelines import manifest, shard_writer
  records = [r for path in manifest.shard_paths(str(shards), "train") for r in shard_writer.read_records(path)]
  ids, mask = model.tokenize([r.captions[0] for r in records])
  rows = np.asarray(model.encode_text(ids, mask), np.float32)
  write_index(out, rows, [r.clip_id for r in records],
              {"created_by": "tests", "kind": "clipvip", "checkpoint": str(checkpoint.absolute()),
               "modality": "video", "source": str(shards.absolute()), "options": {"split": "train"}},
              captions=[r.captions for r in records], part_rows=part_rows)
  assert thumbnails.write_thumbnails(out)
  return out


# The service tests' fixtures (test_serve.py, test_serve_security.py): the caption index above, a Searcher over it
# with the module's model, and a TestClient of the app around it (lifespan run: the query batcher started).


@pytest.fixture(scope="module")
def index_dir(checkpoint, model, shards, tmp_path_factory) -> pathlib.Path:  # pylint: disable=redefined-outer-name
  return write_caption_index(model, checkpoint, shards, tmp_path_factory.mktemp("indexes") / "train")


@pytest.fixture(scope="module")
def searcher(index_dir, model):  # pylint: disable=redefined-outer-name
  from clipvip_jax.retrieval import search
  return search.Searcher(index_dir, model=model)


@pytest.fixture(scope="module")
def client(searcher):  # pylint: disable=redefined-outer-name
  from fastapi.testclient import TestClient
  from clipvip_jax.retrieval import service
  with TestClient(service.create_app(searcher), raise_server_exceptions=False) as c:
    yield c
