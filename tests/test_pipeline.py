"""The Grain pipeline on small shards written here: batch layout, normalisation, determinism, exact resumption
(get_state/set_state through JSON and through orbax), frame masks, evaluation padding, corrupt records."""

import io
import json
import pathlib

import grain
import jax
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from data_pipelines import pipeline, records, sources, transforms

T, S, L = 6, 32, 16
N_TRAIN = 23


def fake_tokenize(texts, max_len):
  """Stand-in for clipvip_jax.tokenizer.tokenize: 1 = start, 2 = end, characters mapped to 3..."""
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for i, text in enumerate(texts):
    tokens = [1] + [3 + ord(c) % 400 for c in text][:max_len - 2] + [2]
    ids[i, :len(tokens)] = tokens
    mask[i, :len(tokens)] = 1
  return ids, mask


def _jpeg(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _clip(rng, k, num_frames, **kw):
  frames = [_jpeg(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(num_frames)]
  kw.setdefault("captions", [f"clip {k} caption {j}" for j in range(1 + k % 3)])
  return records.ClipRecord(clip_id=f"clip{k:03d}", frames=frames, fps=5.0, **kw)


def _write_split(folder, split, payloads, num_shards=2):
  per_shard = -(-len(payloads) // num_shards)
  for s in range(num_shards):
    writer = ArrayRecordWriter(str(folder / f"{split}-{s:05d}-of-{num_shards:05d}.array_record"), "group_size:1")
    for payload in payloads[s * per_shard:(s + 1) * per_shard]:
      writer.write(payload)
    writer.close()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("shards")
  rng = np.random.default_rng(0)
  # Clips of 2..24 frames: with T = 6 the first four are shorter than T.
  train = [_clip(rng, k, 2 + k, subtitle=f"subtitle {k}" if k % 2 else "", caption=f"ofa {k}" if k % 3 else "")
           for k in range(N_TRAIN)]
  _write_split(folder, "train", [records.encode_record(r) for r in train])
  _write_split(folder, "test", [records.encode_record(_clip(rng, k, 8)) for k in range(10)])
  corrupt = [records.encode_record(_clip(rng, k, 8)) for k in range(12)]
  corrupt[3] = b"\x93 not msgpack at all"
  broken = _clip(rng, 7, 8)
  broken.frames = [f[:40] for f in broken.frames]  # truncated JPEGs: the record decodes, its frames do not
  corrupt[7] = records.encode_record(broken)
  _write_split(folder, "corrupt", corrupt)
  solid = [records.ClipRecord(clip_id=f"solid{k}", fps=5.0, captions=["grey"],
                              frames=[_jpeg(np.full((30, 40, 3), 128, np.uint8))] * 3) for k in range(4)]
  _write_split(folder, "solid", [records.encode_record(r) for r in solid], num_shards=1)
  return folder


def _config(shard_dir, **overrides):
  config = dict(shard_dir=str(shard_dir) if shard_dir else None, split="train", num_frames=T, image_size=S, max_text_len=L, batch_size=4,
                seed=3)
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_batch_layout(shard_dir):
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as it:
    batch = next(it)
  assert batch["video"].shape == (4, T, S, S, 3) and batch["video"].dtype == np.float32
  assert batch["frame_mask"].shape == (4, T) and batch["frame_mask"].dtype == np.int32
  assert batch["text_ids"].shape == batch["text_mask"].shape == (4, L) and batch["text_ids"].dtype == np.int32
  assert batch["clip_index"].shape == (4,)
  assert set(batch) == {"video", "frame_mask", "text_ids", "text_mask", "clip_index", "valid"}
  assert batch["valid"].dtype == np.int32 and batch["valid"].all()
  assert (batch["text_ids"][:, 0] == 1).all()  # each row is one tokenised caption


def test_normalisation_values_and_dtypes(shard_dir):
  expected = (128 / 255 - np.array(transforms.CLIP_MEAN)) / np.array(transforms.CLIP_STD)
  for dtype, atol in (("float32", 0.03), ("bfloat16", 0.05)):
    with pipeline.make_train_iterator(_config(shard_dir, split="solid", dtype=dtype),
                                      tokenize_fn=fake_tokenize) as it:
      video = next(it)["video"]
    assert video.dtype == transforms.video_dtype(dtype)
    # JPEG keeps a flat grey within a level or two: tolerance 2/255/std ~ 0.03.
    np.testing.assert_allclose(video.astype(np.float32), np.broadcast_to(expected, video.shape), atol=atol)
  with pipeline.make_train_iterator(_config(shard_dir, split="solid", dtype="uint8"), tokenize_fn=fake_tokenize) as it:
    raw = next(it)
  assert raw["video"].dtype == np.uint8 and abs(int(raw["video"].mean()) - 128) <= 2
  on_device = transforms.normalize_video(jax.numpy.asarray(raw["video"]), raw["frame_mask"], xp=jax.numpy)
  np.testing.assert_allclose(np.asarray(on_device), np.broadcast_to(expected, on_device.shape), atol=0.03)


def test_same_seed_same_batches_other_seed_other_batches(shard_dir):
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as a, \
       pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as b, \
       pipeline.make_train_iterator(_config(shard_dir, seed=4), tokenize_fn=fake_tokenize) as c, \
       pipeline.make_train_iterator(_config(shard_dir, read_threads=0, read_buffer=1),
                                    tokenize_fn=fake_tokenize) as d:
    first, second, other, unthreaded = _take(a, 3), _take(b, 3), _take(c, 3), _take(d, 3)
  _assert_same_batches(first, second)
  _assert_same_batches(first, unthreaded)  # read threads change the speed, never the batches
  assert any((x["clip_index"] != y["clip_index"]).any() for x, y in zip(first, other))


def test_epoch_covers_every_clip_once_and_repeats(shard_dir):
  config = _config(shard_dir, batch_size=1, num_epochs=2)
  with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize) as it:
    seen = [int(b["clip_index"][0]) for b in it]
  assert sorted(seen[:N_TRAIN]) == list(range(N_TRAIN)) and sorted(seen[N_TRAIN:]) == list(range(N_TRAIN))
  assert seen[:N_TRAIN] != seen[N_TRAIN:]  # each epoch reshuffled


def test_resume_from_json_state_gives_the_next_batches(shard_dir):
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as it:
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 4)  # crosses the end of the 23-clip epoch (5 batches of 4)
  state = json.dumps(json.loads(state.decode())).encode()  # what a checkpoint file round-trip does
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as resumed:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 4), expected)


def test_resume_through_orbax(shard_dir, tmp_path):
  import orbax.checkpoint as ocp

  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as it, \
       ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    _take(it, 3)
    manager.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave({"state": it.get_state().decode()})))
    manager.wait_until_finished()
    expected = _take(it, 2)
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as resumed, \
       ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    resumed.set_state(manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data["state"])
    _assert_same_batches(_take(resumed, 2), expected)


def test_global_batches_do_not_depend_on_hosts_or_workers(shard_dir):
  """The same global batches whether one host reads every row or two hosts read two rows each, with or
  without worker processes, and a state taken on one topology resumes on another."""
  config = _config(shard_dir, group_size=2)
  with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize) as whole:
    expected = _take(whole, 7)  # crosses the end of the epoch (11 groups of 2 per 5.5 batches)
  halves = []
  for rows in ((0, 1), (2, 3)):
    with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize, rows=rows) as host:
      _take(host, 4)
      state = host.get_state()
      halves.append(_take(host, 3))
  for k in range(3):
    joined = {key: np.concatenate([halves[0][k][key], halves[1][k][key]]) for key in expected[4 + k]}
    _assert_same_batches([joined], [expected[4 + k]])
  with pipeline.make_train_iterator(dict(config, read_threads=1), tokenize_fn=fake_tokenize, rows=(1, 3)) as other:
    other.set_state(state)  # a state of a host that read rows (2, 3), restored on a host of rows (1, 3)
    batch = next(other)
  for key in batch:
    np.testing.assert_array_equal(batch[key], expected[4][key][[1, 3]], err_msg=key)
  assert json.loads(state)["next_row"] == 4 * 4


def test_state_of_another_order_is_refused(shard_dir):
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as it:
    next(it)
    state = it.get_state()
  with pipeline.make_train_iterator(_config(shard_dir, seed=5), tokenize_fn=fake_tokenize) as other:
    with pytest.raises(ValueError, match="data.seed = 3, this config has 5"):
      other.set_state(state)
    with pytest.raises(ValueError, match="older version"):
      other.set_state(b'{"sampler": "grain"}')
  # A new global batch size continues at the same row: batch 0 of size 2 after 4 rows = rows 4, 5.
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as it:
    next(it)
    rows_4_to_8 = next(it)
  with pipeline.make_train_iterator(_config(shard_dir, batch_size=2), tokenize_fn=fake_tokenize) as smaller:
    smaller.set_state(state)
    np.testing.assert_array_equal(next(smaller)["clip_index"], rows_4_to_8["clip_index"][:2])


def test_device_prefetch_checkpoints_the_consumed_position(shard_dir):
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",)),
                                        jax.sharding.PartitionSpec("data"))
  with pipeline.prefetch_to_device(pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize),
                                   sharding, size=2) as it:
    first = next(it)
    assert isinstance(first["video"], jax.Array) and first["video"].sharding == sharding
    state = it.get_state()  # the prefetcher has already read batches 2 and 3
    expected = _take(it, 2)
  with pipeline.make_train_iterator(_config(shard_dir), tokenize_fn=fake_tokenize) as resumed:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), [jax.device_get(b) for b in expected])


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_resumable(shard_dir):
  config = _config(shard_dir, worker_count=2)
  with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize) as it:
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
  with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize) as resumed:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), expected)
  # Evaluation through workers: the same padded batches as in-process.
  eval_config = _config(shard_dir, split="test", worker_count=2)
  with_workers = list(pipeline.make_eval_dataset(eval_config, tokenize_fn=fake_tokenize).video_batches())
  in_process = list(pipeline.make_eval_dataset(dict(eval_config, worker_count=0),
                                               tokenize_fn=fake_tokenize).video_batches())
  _assert_same_batches(with_workers, in_process)
  # The same batches as in-process loading: workers build whole batches and hand them out in order.
  with pipeline.make_train_iterator(_config(shard_dir, batch_size=1, num_epochs=1, worker_count=2),
                                    tokenize_fn=fake_tokenize) as it, \
       pipeline.make_train_iterator(_config(shard_dir, batch_size=1, num_epochs=1),
                                    tokenize_fn=fake_tokenize) as in_process:
    with_workers = [int(b["clip_index"][0]) for b in it]
    assert with_workers == [int(b["clip_index"][0]) for b in in_process]
    assert sorted(with_workers) == list(range(N_TRAIN))


def test_short_clips_frame_masks(shard_dir):
  # clip k has 2 + k frames; T = 6.
  with pipeline.make_train_iterator(_config(shard_dir, sampling="clip2video", resize_mode="crop", batch_size=1,
                                            num_epochs=1), tokenize_fn=fake_tokenize) as it:
    for batch in it:
      total = 2 + int(batch["clip_index"][0])
      mask = batch["frame_mask"][0]
      np.testing.assert_array_equal(mask, [1] * min(total, T) + [0] * max(T - total, 0))
      assert not batch["video"][0][mask == 0].any()  # padded frames are zeros
      assert batch["video"][0][mask == 1].std(axis=(1, 2, 3)).min() > 0.1  # real frames are not
  with pipeline.make_train_iterator(_config(shard_dir, batch_size=N_TRAIN, shuffle=False),
                                    tokenize_fn=fake_tokenize) as it:
    assert next(it)["frame_mask"].all()  # CLIP-ViP repeats frames of short clips instead of padding


def test_pretraining_fields(shard_dir):
  with pipeline.make_train_iterator(_config(shard_dir, pretraining=True, batch_size=N_TRAIN, shuffle=False),
                                    tokenize_fn=fake_tokenize) as it:
    batch = next(it)
  for name in ("subtitle", "caption"):
    assert batch[f"{name}_ids"].shape == batch[f"{name}_mask"].shape == (N_TRAIN, L)
  np.testing.assert_array_equal(batch["image"], batch["video"][:, T // 2])
  none_ids, _ = fake_tokenize(["None"], L)
  for row, k in enumerate(batch["clip_index"]):
    subtitle = f"subtitle {k}" if k % 2 else "None"
    caption = f"ofa {k}" if k % 3 else "None"  # the original feeds "None" for a missing OFA caption
    np.testing.assert_array_equal(batch["subtitle_ids"][row], fake_tokenize([subtitle], L)[0][0])
    np.testing.assert_array_equal(batch["caption_ids"][row], fake_tokenize([caption], L)[0][0])
  assert any((batch["caption_ids"][r] == none_ids[0]).all() for r in range(N_TRAIN))


def test_corrupt_records_keep_their_rows_masked_and_counted(shard_dir, caplog):
  config = _config(shard_dir, split="corrupt", batch_size=1, num_epochs=1)
  with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize) as it:
    batches = list(it)
    assert it.num_corrupt == 2
  seen = {int(b["clip_index"][0]): int(b["valid"][0]) for b in batches}
  assert seen == {k: int(k not in (3, 7)) for k in range(12)}  # every row stays; the corrupt ones are invalid
  for b in batches:
    if not b["valid"][0]:  # a placeholder the encoders stay finite on: zero pixels, real frames, one token
      assert not b["video"].any() and b["frame_mask"].all() and b["text_mask"].sum() == 1
  assert "corrupt clip record 3" in caplog.text and "corrupt clip record 7" in caplog.text

  data = pipeline.make_eval_dataset(_config(shard_dir, split="corrupt"), tokenize_fn=fake_tokenize)
  assert data.num_corrupt == 1 and data.clip_ids[3] == "" and 3 not in data.text_video_index
  valid = {}
  for batch in data.video_batches():
    valid.update(zip(batch["clip_index"].tolist(), batch["valid"].tolist()))
  assert valid == {k: int(k not in (3, 7)) for k in range(12)}


def test_eval_texts_and_padded_video_batches(shard_dir):
  data = pipeline.make_eval_dataset(_config(shard_dir, split="test"), tokenize_fn=fake_tokenize)
  assert data.num_videos == 10 and data.clip_ids == [f"clip{k:03d}" for k in range(10)]
  captions_per_clip = [1 + k % 3 for k in range(10)]
  np.testing.assert_array_equal(data.text_video_index, np.repeat(np.arange(10), captions_per_clip))
  np.testing.assert_array_equal(data.text_ids[1], fake_tokenize(["clip 1 caption 0"], L)[0][0])
  batches = list(data.video_batches())
  assert len(batches) == data.num_batches() == 3
  np.testing.assert_array_equal(np.concatenate([b["clip_index"] for b in batches]), list(range(10)) + [-1, -1])
  np.testing.assert_array_equal(batches[-1]["valid"], [1, 1, 0, 0])
  assert not batches[-1]["video"][2:].any() and not batches[-1]["frame_mask"][2:].any()
  again = list(data.video_batches())  # deterministic: test-time sampling, no shuffle
  _assert_same_batches(batches, again)

  paragraph = pipeline.make_eval_dataset(_config(shard_dir, split="test", paragraph=True, max_text_len=64),
                                         tokenize_fn=fake_tokenize)
  np.testing.assert_array_equal(paragraph.text_video_index, np.arange(10))
  np.testing.assert_array_equal(paragraph.text_ids[2],
                                fake_tokenize(["clip 2 caption 0 clip 2 caption 1 clip 2 caption 2"], 64)[0][0])


def test_eval_hosts_get_equal_batch_counts(shard_dir):
  seen = []
  for host in range(3):
    data = pipeline.make_eval_dataset(_config(shard_dir, split="test", batch_size=6), tokenize_fn=fake_tokenize,
                                      process_index=host, process_count=3)
    batches = list(data.video_batches())
    assert len(batches) == 2 and all(b["video"].shape[0] == 2 for b in batches)  # 4, 4, 2 videos per host
    seen += [i for b in batches for i, v in zip(b["clip_index"], b["valid"]) if v]
  assert seen == list(range(10))


def test_config_dict_errors_and_sources(shard_dir):
  config = ml_collections.ConfigDict(_config(shard_dir))
  assert pipeline.DataConfig.from_config(config).batch_size == 4
  with pytest.raises(ValueError, match="num_frame"):
    pipeline.DataConfig.from_config(_config(shard_dir, num_frame=8))
  with pytest.raises(ValueError, match="resize_mode"):
    pipeline.DataConfig.from_config(_config(shard_dir, resize_mode="pad"))
  with pytest.raises(ValueError, match="data.read_threads"):
    pipeline.DataConfig.from_config(_config(shard_dir, read_threads=-1))
  with pytest.raises(ValueError, match="data.read_buffer"):
    pipeline.DataConfig.from_config(_config(shard_dir, read_buffer=0))
  with pytest.raises(FileNotFoundError, match="validation"):
    pipeline.make_train_iterator(_config(shard_dir, split="validation"), tokenize_fn=fake_tokenize)
  # Any random-access sequence of record bytes is a source (a tfds.data_source wrapper plugs in here).
  in_memory = [bytes(sources.open_split(shard_dir, "test")[k]) for k in range(10)]
  with pipeline.make_train_iterator(_config(None, batch_size=2), source=in_memory, tokenize_fn=fake_tokenize) as it:
    assert next(it)["video"].shape == (2, T, S, S, 3)
    state = it.get_state()
    expected = next(it)
  assert len(state) < 2000  # the state names the in-memory source, it does not hold it
  with pipeline.make_train_iterator(_config(None, batch_size=2), source=in_memory, tokenize_fn=fake_tokenize) as it:
    it.set_state(state)
    _assert_same_batches([next(it)], [expected])


def test_default_tokenizer_is_clip_bpe(shard_dir):
  pytest.importorskip("clipvip_jax.tokenizer")
  with pipeline.make_train_iterator(_config(shard_dir, split="test", shuffle=False)) as it:
    batch = next(it)
  from clipvip_jax.tokenizer import SOT_ID, tokenize
  assert (batch["text_ids"][:, 0] == SOT_ID).all()
  # shuffle off: the first batch is clips 0..3; clip 0 has one caption.
  np.testing.assert_array_equal(batch["text_ids"][0], tokenize(["clip 0 caption 0"], L)[0][0])


def _write_one_record(path):
  writer = ArrayRecordWriter(str(path), "group_size:1")
  writer.write(b"x")
  writer.close()


def test_shard_paths_manifest_and_pattern(shard_dir, tmp_path):
  paths = sources.shard_paths(shard_dir, "train")
  assert [p.rsplit("/", 1)[1] for p in paths] == ["train-00000-of-00002.array_record",
                                                   "train-00001-of-00002.array_record"]
  partial = tmp_path / "partial"
  partial.mkdir()
  _write_one_record(partial / "train-00001-of-00003.array_record")
  with pytest.raises(FileNotFoundError, match="1 of 3"):
    sources.shard_paths(partial, "train")
  listed = tmp_path / "listed"
  listed.mkdir()
  _write_one_record(listed / "a.array_record")  # a real (readable) shard: every shard's footer is checked
  (listed / "manifest.json").write_text(json.dumps(
      {"schema_version": 1, "splits": {"train": {"shards": ["a.array_record"]}},
       "shards": [{"file": "a.array_record", "split": "train", "records": 0}]}))
  assert sources.shard_paths(listed, "train") == [str(listed / "a.array_record")]
  # A relative folder (as `make demo` passes demo_out/data) resolves to the same files.
  import os
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    assert [pathlib.Path(p).resolve() for p in sources.shard_paths("listed", "train")] == [listed / "a.array_record"]
  finally:
    os.chdir(cwd)


def test_group_size_keeps_consecutive_records_in_one_batch(shard_dir):
  config = _config(shard_dir, batch_size=4, group_size=2, num_epochs=1)
  with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize) as it:
    batches = list(it)
  seen = []
  for b in batches:
    assert b["video"].shape == (4, T, S, S, 3) and b["text_ids"].shape == (4, L)
    idx = b["clip_index"].tolist()
    # Members of a group sit next to each other: (2j, 2j+1).
    assert all(idx[i] % 2 == 0 and idx[i + 1] == idx[i] + 1 for i in (0, 2)), idx
    seen += idx
  # 11 groups of 2 (record 22 is left out), 5 full batches of 2 groups: 20 distinct records.
  assert len(seen) == len(set(seen)) == 20 and set(seen) <= set(range(22))
  with pytest.raises(ValueError, match="group_size"):
    pipeline.make_train_iterator(_config(shard_dir, batch_size=4, group_size=3), tokenize_fn=fake_tokenize)


def test_group_with_a_corrupt_record_keeps_its_rows_and_is_counted(shard_dir):
  # "corrupt" split: record 3 does not decode, record 7's frames fail: their rows are masked, their twins stay.
  config = _config(shard_dir, split="corrupt", batch_size=2, group_size=2, num_epochs=1, shuffle=False)
  with pipeline.make_train_iterator(config, tokenize_fn=fake_tokenize) as it:
    batches = list(it)
    assert it.num_corrupt == 2  # counted with group_size > 1 too
  assert [b["clip_index"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
  assert [b["valid"].tolist() for b in batches] == [[1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 1]]
