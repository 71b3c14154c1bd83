"""python -m clipvip_jax.export: parity of the ONNX and StableHLO graphs with the JAX model for every kind, search
on an exported model without flax, optax or orbax, and the command's refusals and atomic replacement."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

import retrieval_helpers as rh
from clipvip_jax import encode
from clipvip_jax.export import command, routes, spec, writer
from clipvip_jax.export.runtime import load_exported
from clipvip_jax.models import clip
from clipvip_jax.retrieval import model as model_lib
from clipvip_jax.retrieval.index import read_index
from clipvip_jax.retrieval.search import Searcher
from data_pipelines import synthetic, transforms

REPO = pathlib.Path(__file__).resolve().parents[1]
FORMATS = ("onnx", "stablehlo")
KINDS = ("clip", "meanp", "clipvip", "clip2video")
TOLERANCE = 1e-4  # the fixtures' own bound for float32 embeddings and logits


def _fixture_model(fixtures_dir, name: str) -> model_lib.RetrievalModel:
  return model_lib.load_model(fixtures_dir / f"{name}_tiny.pt", fixtures_dir / f"{name}_tiny_config.json",
                              trust_pickle=True)


@pytest.fixture(scope="module")
def models(fixtures_dir, tmp_path_factory) -> dict[str, model_lib.RetrievalModel]:
  """One model per kind: the parity fixtures' CLIP-ViP and CLIP2Video, a tiny random image CLIP (a converted dir,
  loaded as encode loads it: frames mean-pooled) and the demo's meanP baseline around the same towers."""
  cfg = clip.clip_config("tiny")
  params = rh.random_params("clip", cfg, seed=1)
  from clipvip_jax import converted_checkpoint
  from clipvip_jax.convert.common import Converted
  clip_dir = converted_checkpoint.save_converted(Converted("clip", cfg, params, source="random"),
                                                 tmp_path_factory.mktemp("clip") / "clip")
  from clipvip_jax.loading import Loaded
  from clipvip_jax.retrieval.pretrained import from_loaded
  meanp = model_lib.RetrievalModel(from_loaded(Loaded("meanp", cfg, params, path="random")), "meanp",
                                   model_lib.default_recipe("meanp", cfg))
  return {"clip": model_lib.load_model(clip_dir), "meanp": meanp,
          "clipvip": _fixture_model(fixtures_dir, "clipvip"), "clip2video": _fixture_model(fixtures_dir, "clip2video")}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> dict[tuple[str, str], pathlib.Path]:
  root = tmp_path_factory.mktemp("exports")
  # The export's own check (both graphs against the JAX model at batch 2) runs in the search test below; here the
  # parity test does it at batch 1 and 3.
  return {(kind, fmt): writer.export_model(models[kind], root / f"{kind}-{fmt}", fmt, platforms=("cpu",),
                                           check=False) for kind in KINDS for fmt in FORMATS}


def _text_inputs(fixtures_dir, kind: str, model) -> tuple[np.ndarray, np.ndarray]:
  """Three token rows: the fixtures' own (ids below their 1000-word vocabulary) or CLIP-tokenized captions."""
  if kind in ("clipvip", "clip2video"):
    io = np.load(fixtures_dir / f"{kind}_tiny_io.npz")
    ids, mask = io["text_ids"].astype(np.int32), io["text_mask"].astype(np.int32)
    return np.concatenate([ids, ids])[:3], np.concatenate([mask, mask])[:3]
  return model.tokenize(["a red circle moves left", "a blue square", "two green triangles grow slowly"])


def _video(batch: int, frames: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, frames), np.int32)
  mask[-1, -1] = 0 if frames > 1 else 1  # a padded slot in the last clip
  return rng.integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8), mask


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_exported_encoders_match_the_jax_model(kind, fmt, models, exports, fixtures_dir):
  model, exported = models[kind], load_exported(exports[kind, fmt])
  manifest = exported.manifest
  assert manifest["kind"] == kind and manifest["runtime"] == fmt
  ids, mask = _text_inputs(fixtures_dir, kind, model)
  # The frame counts the export claims: the recipe's, and another where the count is dynamic.
  # (CLIP-ViP at 3 and 6 frames resamples its temporal embedding of 4 inside the StableHLO graph.)
  frame_counts = ((model.recipe.num_frames, 3, 6) if manifest["frames"]["dynamic"] else
                  (manifest["frames"]["count"],))
  assert manifest["frames"]["dynamic"] == (kind in ("clip", "meanp") or (kind, fmt) == ("clipvip", "stablehlo"))
  for batch in (1, 3):
    text = exported.encode_text(ids[:batch], mask[:batch])
    np.testing.assert_allclose(text, np.asarray(model.encode_text(ids[:batch], mask[:batch])), atol=TOLERANCE,
                               rtol=0)
    assert text.shape == (batch, manifest["embedding_dim"]) and text.dtype == np.float32
    for frames in frame_counts:
      video, frame_mask = _video(batch, frames, model.input_size, seed=batch * 10 + frames)
      expected = model.encode_video(transforms.normalize_frames(video, frame_mask, np.float32), frame_mask)
      np.testing.assert_allclose(exported.encode_video(video, frame_mask), np.asarray(expected), atol=TOLERANCE,
                                 rtol=0)
  if kind == "clip2video":  # the dual-encoder form: the dot product is the original's inference logits
    video, frame_mask = _video(3, 6, model.input_size, seed=0)
    scores = exported.similarity(exported.encode_text(ids, mask), exported.encode_video(video, frame_mask))
    pixels = transforms.normalize_frames(video, frame_mask, np.float32)
    np.testing.assert_allclose(scores, np.asarray(model.similarity(model.encode_text(ids, mask),
                                                                   model.encode_video(pixels, frame_mask))),
                               atol=TOLERANCE, rtol=0)


def test_the_folder_holds_what_a_deployment_needs(exports, models, tmp_path):
  root = exports["clipvip", "onnx"]
  manifest = json.loads((root / spec.MANIFEST).read_text())
  assert set(manifest["files"]) == {"text_encoder.onnx", "video_encoder.onnx", "preprocess.json",
                                    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer.json",
                                    "tokenizer/LICENSE"}
  spec.verify(root, manifest)  # every checksum holds
  assert manifest["graphs"]["video"]["inputs"][0] == {"name": "frames", "dtype": "uint8",
                                                      "shape": ["batch", 4, 32, 32, 3]}
  assert manifest["graphs"]["text"]["inputs"][0]["shape"] == ["batch", 16]
  assert manifest["versions"]["jax"] and manifest["versions"]["jax2onnx"] and manifest["embedding_dim"] == 32
  pre = json.loads((root / spec.PREPROCESS).read_text())
  assert (pre["num_frames"], pre["image_size"], pre["sampling"], pre["resize_mode"]) == (4, 32, "clipvip", "squash")
  assert tuple(pre["mean"]) == transforms.CLIP_MEAN and tuple(pre["std"]) == transforms.CLIP_STD
  assert "linspace" in pre["explained"]["sampling"]
  # The written vocabulary gives the shipped tokenizer's ids.
  texts = ["A man is playing a guitar!", "deux chiens jouent &amp; courent"]
  exported = load_exported(root)
  for got, want in zip(exported.tokenize(texts), models["clip"].tokenize(texts)):
    np.testing.assert_array_equal(got[:, :16], want[:, :16])
  assert manifest["tokenizer"]["end_id"] == 49407
  # onnxruntime's optimiser keeps the weights as they are: no copy of each kernel per text position, which
  # jax2onnx's own einsum led it to make (routes.write_onnx; 1.23x this file, 11 GB at B/32).
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
  ort.InferenceSession(str(root / "text_encoder.onnx"), options, providers=["CPUExecutionProvider"])
  assert (tmp_path / "optimized.onnx").stat().st_size < 1.05 * (root / "text_encoder.onnx").stat().st_size
  # meanP's frames are dynamic, stated in the graph's shape.
  meanp = json.loads((exports["meanp", "stablehlo"] / spec.MANIFEST).read_text())
  assert meanp["graphs"]["video"]["inputs"][1]["shape"] == ["batch", "frames"]


# ---- search and serve on an exported model, with the training stack unimportable ----

# Runs in a fresh interpreter: PathFinder is wrapped so that flax, optax and orbax are "not installed"
# (find_spec returns None, import raises ModuleNotFoundError), as on a machine without them.
_WITHOUT_TRAINING_STACK = """
import importlib.machinery, sys
BLOCKED = {"flax", "optax", "orbax"}
class WithoutTrainingStack(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.partition(".")[0] in BLOCKED:
      return None
    return super().find_spec(name, path, target)
sys.meta_path[:] = [WithoutTrainingStack if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
  import flax
  raise SystemExit("flax is still importable")
except ModuleNotFoundError:
  pass
"""

_SEARCH_AND_SERVE = """
import contextlib, io, json, sys
from clipvip_jax import search as search_command
from clipvip_jax.retrieval import search, service
index, queries, out = sys.argv[1], json.loads(sys.argv[2]), {}
for model_dir in sys.argv[3:]:
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    status = search_command.main(["--index", index, "--model", model_dir, "--top-k", "10", "--json", *queries])
  assert status == 0, status
  from fastapi.testclient import TestClient
  with TestClient(service.create_app(search.Searcher(index, model_dir=model_dir))) as client:
    api = client.get("/api/search", params={"q": queries[0], "top_k": 10}).json()
  out[model_dir] = {"search": json.loads(stdout.getvalue()), "api": [r["id"] for r in api["results"]]}
loaded = sorted(m for m in sys.modules
                if m.partition(".")[0] in ("flax", "optax", "orbax", "torch") or m.startswith("clipvip_jax.models"))
print(json.dumps({"results": out, "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """A demo-sized index: 300 synthetic clips (the demo's test split is 300) encoded with a tiny CLIP-ViP."""
  root = tmp_path_factory.mktemp("demo")
  synthetic.generate(str(root / "data"), 376, seed=0)  # 300 train clips
  checkpoint = rh.write_tiny_clipvip(root / "clipvip")
  assert encode.main(["--checkpoint", str(checkpoint), "--shards", str(root / "data"), "--split", "train",
                      "--out", str(root / "index"), "--batch-size", "64", "--quiet"]) == 0
  return checkpoint, root / "index"


def test_search_and_serve_on_an_exported_model_need_no_flax(demo_index, tmp_path, capsys):
  checkpoint, index_dir = demo_index
  index = read_index(index_dir)
  assert index.count == 300
  queries = sorted({index.captions(row)[0] for row in range(0, 300, 37)})
  expected = Searcher(index_dir, warn=False).search(queries, top_k=10)
  exported = []
  for fmt in FORMATS:  # the command, as a user runs it (StableHLO lowered for cpu, cuda and tpu)
    assert command.main([str(checkpoint), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    printed = capsys.readouterr().out
    frames = "4" if fmt == "onnx" else "dynamic"
    assert f"as {fmt} to {tmp_path / fmt} (32-dim, batch dynamic, frames {frames})" in printed
    assert "checked against the JAX model: max abs error" in printed
    exported.append(str(tmp_path / fmt))
  assert json.loads((tmp_path / "stablehlo" / spec.MANIFEST).read_text())["graphs"]["text"]["platforms"] == \
      ["cpu", "cuda", "tpu"]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  run = subprocess.run([sys.executable, "-c", _WITHOUT_TRAINING_STACK + _SEARCH_AND_SERVE, str(index_dir),
                        json.dumps(queries), *exported], capture_output=True, text=True, env=env, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(run.stdout.strip().splitlines()[-1])
  assert report["loaded"] == []  # neither the training stack, torch nor the project's model code was imported
  for model_dir in exported:
    got = report["results"][model_dir]
    for ranking, want in zip(got["search"], expected):
      assert [r["id"] for r in ranking["results"]] == [clip_id for clip_id, _ in want]
      np.testing.assert_allclose([r["score"] for r in ranking["results"]], [s for _, s in want], atol=TOLERANCE)
    assert got["api"] == [clip_id for clip_id, _ in expected[0]]


# ---- the command: refusals, and replacing an export atomically ----


def _run_command(argv, capsys) -> tuple[int, str]:
  with pytest.raises(SystemExit) as exit_info:
    command.main(argv)
  return exit_info.value.code, capsys.readouterr().err


def test_a_missing_package_is_one_sentence_with_its_install_line(monkeypatch, tmp_path, capsys):
  real = routes._find  # pylint: disable=protected-access
  monkeypatch.setattr(routes, "_find", lambda m: None if m == "jax2onnx" else real(m))
  out = tmp_path / "out"
  code, err = _run_command(["/nonexistent.pt", "--format", "onnx", "--out", str(out)], capsys)
  assert code == 2 and err.count("\n") == 1
  assert "jax2onnx" in err and "pip install jax2onnx onnxruntime" in err
  assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_kind_that_cannot_be_exported_is_refused_before_any_work(tmp_path, capsys):
  checkpoint = rh.write_tiny_clipvip(tmp_path / "ckpt")
  config = json.loads((checkpoint / "config.json").read_text())
  (checkpoint / "config.json").write_text(json.dumps({**config, "kind": "seqlstm"}))
  out = tmp_path / "out"
  code, err = _run_command([str(checkpoint), "--format", "stablehlo", "--out", str(out)], capsys)
  assert code == 2 and err.count("\n") == 1
  assert "'seqlstm' model, which cannot be exported" in err and "clip, meanp, clipvip, clip2video" in err
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_out_that_is_not_an_export_is_left_alone(tmp_path, capsys):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("mine")
  code, err = _run_command([str(tmp_path / "missing"), "--format", "stablehlo", "--out", str(tmp_path / "notes")],
                           capsys)
  assert code == 2 and "is not an exported model" in err
  assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def _read_consistently(root: pathlib.Path) -> str | None:
  """The manifest's text after checking every file, all read through one open directory (the folder cannot be
  swapped under the reader half way). None when the folder read was replaced meanwhile and is being removed: that
  reader held the previous export, which is no longer visible at `root`; a failure on the folder that is still at
  `root` would be a half-written export, and raises."""
  fd = os.open(root, os.O_RDONLY)
  try:
    pinned = pathlib.Path(f"/proc/self/fd/{fd}")
    try:
      manifest = spec.read_manifest(pinned)
      spec.verify(pinned, manifest)
      return (pinned / spec.MANIFEST).read_text()
    except (spec.ExportError, OSError):
      if os.fstat(fd).st_ino != os.stat(root).st_ino:
        return None
      raise
  finally:
    os.close(fd)


def test_re_export_replaces_the_folder_atomically(models, tmp_path, monkeypatch):
  model, out = models["meanp"], tmp_path / "export"
  writer.export_model(model, out, "stablehlo", platforms=("cpu",), check=False)
  first = _read_consistently(out)
  # A reader polling the folder during a re-export sees the old export or the new one, each complete.
  seen, errors, done = set(), [], threading.Event()

  def poll():
    while not done.is_set():
      try:
        seen.add(_read_consistently(out))
      except Exception as e:  # noqa: BLE001 — any failure to read a whole export is the finding
        errors.append(repr(e))

  reader = threading.Thread(target=poll)
  reader.start()
  try:
    writer.export_model(model, out, "stablehlo", frames=3, platforms=("cpu",), check=False)
  finally:
    done.set()
    reader.join()
  second = _read_consistently(out)
  assert errors == [] and seen - {None}
  assert seen <= {first, second, None} and json.loads(second)["frames"]["count"] == 3
  # A failure half way (the video graph) leaves the last complete export in place and no temporary folder.
  real = routes.WRITERS["stablehlo"]

  def fail_on_video(fn, args, names, path, name, **options):
    if name == "video_encoder":
      raise RuntimeError("disk full")
    return real(fn, args, names, path, name, **options)

  monkeypatch.setitem(routes.WRITERS, "stablehlo", fail_on_video)
  with pytest.raises(RuntimeError, match="disk full"):
    writer.export_model(model, out, "stablehlo", platforms=("cpu",), check=False)
  assert _read_consistently(out) == second
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_spec_pixel_statistics_are_the_pipelines():
  assert spec.CLIP_MEAN == transforms.CLIP_MEAN and spec.CLIP_STD == transforms.CLIP_STD


def test_a_model_built_with_the_tpu_kernel_is_refused_and_the_command_builds_with_xla(tmp_path, monkeypatch):
  """attention "auto" is the TPU kernel on a TPU host (here: a model built for a TPU target): its graph would run
  on TPU only, so export_model refuses it in one sentence before writing anything, and the export command loads
  checkpoints with XLA's attention whatever their config says."""
  from clipvip_jax.models import layers
  checkpoint = rh.write_tiny_clipvip(tmp_path / "ckpt")
  with layers.build_target(layers.Target("tpu")):
    on_tpu = model_lib.load_model(checkpoint, attention="auto")
  out = tmp_path / "out"
  with pytest.raises(command.UsageError, match="built with the TPU attention kernel; an export needs the portable"):
    writer.export_model(on_tpu, out, "stablehlo", check=False)
  assert not out.exists()
  loads = []
  real_load = model_lib.load_model
  monkeypatch.setattr(model_lib, "load_model", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
  with layers.build_target(layers.Target("tpu")):
    assert command.main([str(checkpoint), "--format", "stablehlo", "--out", str(out), "--no-check"]) in (0, None)
  assert loads and loads[0]["attention"] == "xla" and (out / spec.MANIFEST).is_file()
