"""encode + search end to end on a tiny random CLIP-ViP, the synthetic shards, a videos folder and a text file."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import retrieval_helpers as rh
from retrieval_helpers import checkpoint, model, shards  # noqa: F401 (pytest fixtures)
from clipvip_jax import encode
from clipvip_jax import search as search_command
from clipvip_jax.retrieval import indexer, search, video_files
from clipvip_jax.retrieval.index import read_index
from clipvip_jax.retrieval.model import load_model
from data_pipelines import manifest, shard_writer


def _encode(model, inputs, out, **options) -> np.ndarray:
  """The library side of encode: the index's rows, float32."""
  indexer.build_index(model, inputs, out, meta={"kind": model.kind, "checkpoint": model.checkpoint,
                                                "modality": inputs.modality}, progress=False, **options)
  return read_index(out).embeddings()


@pytest.fixture(scope="module")
def shard_index(checkpoint, shards, tmp_path_factory) -> pathlib.Path:
  """The train split (16 clips) encoded in batches of 5, so the last batch is padded."""
  out = tmp_path_factory.mktemp("indexes") / "train"
  assert encode.main(["--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "train",
                      "--out", str(out), "--batch-size", "5", "--quiet"]) == 0
  return out


def test_encode_shards_writes_ids_captions_and_normalised_embeddings(shard_index, shards, checkpoint):
  index = read_index(shard_index)
  records = [r for path in manifest.shard_paths(str(shards), "train") for r in shard_writer.read_records(path)]
  assert index.ids == [r.clip_id for r in records]
  assert [index.captions(r) for r in range(index.count)] == [r.captions for r in records]
  assert index.embeddings().shape == (16, 32) and index.dtype == "float32"
  np.testing.assert_allclose(np.linalg.norm(index.embeddings(), axis=1), 1.0, atol=1e-5)
  assert index.kind == "clipvip" and index.modality == "video" and index.skipped() == []
  assert index.meta["checkpoint"] == str(checkpoint.absolute())
  options = index.meta["options"]
  assert (options["num_frames"], options["image_size"], options["sampling"], options["resize_mode"]) == \
      (4, 32, "clipvip", "squash")
  assert not list(shard_index.parent.glob(".*"))  # the staging folder was renamed away


def test_shard_embeddings_do_not_depend_on_batching(shard_index, shards, model, tmp_path):
  # One batch of 16 against the CLI's batches of 5 (the last one padded with repeated rows).
  whole = _encode(model, indexer.ShardClips(shards, "train", model.recipe), tmp_path / "whole", batch_size=16)
  np.testing.assert_allclose(whole, read_index(shard_index).embeddings(), atol=1e-5)
  # Time-reversed twins hold the same frames in another order: a temporal model must tell them apart.
  assert not np.allclose(whole[0], whole[1], atol=1e-4)


def test_encode_texts_matches_the_model(model, checkpoint, tmp_path):
  texts = tmp_path / "queries.txt"
  texts.write_text("a red circle moves left\n\n  a blue square moves up  \nsomething else\n", encoding="utf-8")
  out = tmp_path / "texts"
  assert encode.main(["--checkpoint", str(checkpoint), "--texts", str(texts), "--out", str(out), "--quiet"]) == 0
  index = read_index(out)
  assert index.modality == "text"
  assert index.ids == ["a red circle moves left", "a blue square moves up", "something else"]
  ids, mask = model.tokenize(index.ids)
  np.testing.assert_allclose(index.embeddings(), np.asarray(model.encode_text(ids, mask)), atol=1e-5)


def test_search_ranks_by_the_models_similarity(shard_index, model):
  queries = ["a large red circle moves up and left quickly", "a small blue square moves right"]
  rankings = search.search(shard_index, queries, top_k=5)
  index = read_index(shard_index)
  ids, mask = model.tokenize(queries)
  direct = np.asarray(model.similarity(model.encode_text(ids, mask), index.embeddings()))
  assert len(rankings) == 2
  for row, ranking in enumerate(rankings):
    assert len(ranking) == 5
    assert [clip_id for clip_id, _ in ranking] == [index.ids[j] for j in np.argsort(-direct[row])[:5]]
    for clip_id, score in ranking:
      assert score == pytest.approx(float(direct[row, index.ids.index(clip_id)]), abs=1e-5)
    scores = [s for _, s in ranking]
    assert scores == sorted(scores, reverse=True)


def test_search_top_k_beyond_the_index_returns_every_clip_once(shard_index, model):
  (ranking,) = search.search(shard_index, "a green triangle", top_k=100, model=model)
  assert sorted(clip_id for clip_id, _ in ranking) == sorted(read_index(shard_index).ids)


def test_search_command_prints_ranked_clips_with_captions(shard_index, capsys):
  assert search_command.main(["--index", str(shard_index), "a yellow diamond moves down", "--top-k", "3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == "query: a yellow diamond moves down"
  assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
  assert all(" moves " in line for line in lines[1:])  # each clip printed with its caption


def test_search_json_output(shard_index, capsys):
  assert search_command.main(["--index", str(shard_index), "q one", "q two", "--top-k", "2", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert [r["query"] for r in result] == ["q one", "q two"]
  assert all(len(r["results"]) == 2 for r in result)


def test_search_states_a_cut_query_and_refuses_an_absurd_one(shard_index, capsys):
  long_query = "a yellow diamond moves down " * 8  # more tokens than the model's text length
  assert search_command.main(["--index", str(shard_index), long_query, "--top-k", "1"]) == 0
  err = capsys.readouterr().err
  assert "note: query 1 has" in err and "only the first" in err
  with pytest.raises(SystemExit) as stop:
    search_command.main(["--index", str(shard_index), "x" * 10_001])
  assert stop.value.code == 2
  err = capsys.readouterr().err
  assert "query 1 is 10001 characters long" in err and "Traceback" not in err


def test_encode_videos_skips_and_reports_a_corrupt_file(checkpoint, model, tmp_path, capsys):
  videos = tmp_path / "videos"
  videos.mkdir()
  rh.write_video(videos / "clip_b.mp4", seed=1)
  rh.write_video(videos / "clip_a.mp4", seed=2)
  (videos / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
  (videos / "notes.txt").write_text("not a video")
  (videos / "._clip_a.mp4").write_bytes(b"\x00\x05\x16\x07 a macOS resource fork")  # hidden: not a clip
  frames = videos / "frames"
  frames.mkdir()
  from PIL import Image
  for i in range(6):
    Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(frames / f"{i}.jpg")
  out = tmp_path / "index"
  assert encode.main(["--checkpoint", str(checkpoint), "--videos", str(videos), "--out", str(out),
                      "--batch-size", "2", "--workers", "2", "--quiet"]) == 0
  captured = capsys.readouterr()
  assert "skipped broken:" in captured.err
  assert "3 videos, 1 skipped" in captured.out
  index = read_index(out)
  assert index.ids == ["clip_a", "clip_b", "frames"]
  assert [s["id"] for s in index.skipped()] == ["broken"]
  assert index.skipped()[0]["reason"]
  video, mask = video_files.load_video(videos / "clip_a.mp4", model.recipe, fps=5.0)
  np.testing.assert_allclose(index.embeddings()[0], np.asarray(model.encode_video(video[None], mask[None]))[0],
                             atol=1e-5)


def test_a_training_workdir_is_a_checkpoint_too(tmp_path, shards):
  """The trainer's Orbax workdir (here the demo's meanP baseline kind) loads with its run's data recipe."""
  from clipvip_jax.models import clip
  from clipvip_jax.converted_checkpoint import nest
  from clipvip_jax.train.checkpoint import Checkpointer
  cfg = clip.clip_config("tiny")
  params = rh.random_params("clip", cfg)  # meanP has exactly CLIP's parameters
  workdir = tmp_path / "run"
  checkpointer = Checkpointer(workdir, async_save=False)
  checkpointer.save(7, nest(params), {"count": np.zeros((), np.int32)}, "{}",
                    {"kind": "meanp", "model": cfg.to_dict()},
                    {"data": {"num_frames": 8, "image_size": 32, "sampling": "clipvip", "resize_mode": "squash",
                              "max_text_len": 12}})
  checkpointer.close()
  model = load_model(workdir)
  assert (model.kind, model.step) == ("meanp", 7)
  assert (model.recipe.num_frames, model.recipe.sampling, model.recipe.max_text_len) == (8, "clipvip", 12)
  encoded = _encode(model, indexer.ShardClips(shards, "test", model.recipe), tmp_path / "index", batch_size=2)
  assert encoded.shape == (2, 32)
  # meanP ignores frame order: the twins (all 8 frames, reversed) get the same embedding.
  np.testing.assert_allclose(encoded[0], encoded[1], atol=1e-5)


def test_clip2video_index_scores_are_the_models_logits(shards, tmp_path, capsys):
  """CLIP2Video's recipe (its sampling, centre crop) and its own inference logits as search scores."""
  checkpoint = rh.write_tiny_clip2video(tmp_path / "clip2video")
  out = tmp_path / "index"
  assert encode.main(["--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "train",
                      "--out", str(out), "--batch-size", "8", "--quiet"]) == 0
  index = read_index(out)
  assert index.kind == "clip2video"
  assert (index.meta["options"]["sampling"], index.meta["options"]["resize_mode"]) == ("clip2video", "crop")
  model = load_model(checkpoint)
  query = "a small green cross moves down slowly"
  (ranking,) = search.search(out, query, top_k=4, model=model)
  ids, mask = model.tokenize([query])
  logits = np.asarray(model.pretrained.model.similarity(model.encode_text(ids, mask), index.embeddings()))[0]
  assert [clip_id for clip_id, _ in ranking] == [index.ids[j] for j in np.argsort(-logits)[:4]]
  np.testing.assert_allclose([s for _, s in ranking], np.sort(logits)[::-1][:4], rtol=1e-5)
  with pytest.raises(SystemExit) as exc:
    encode.main(["--checkpoint", str(checkpoint), "--shards", str(shards), "--out", str(tmp_path / "x"),
                 "--num-frames", "17", "--quiet"])
  assert exc.value.code == 2
  assert "--num-frames 17 is more than the 16 frames this clip2video model has positions for" in \
      capsys.readouterr().err
