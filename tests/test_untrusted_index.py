"""An index folder from anywhere (issue 27): the reader, search and `python -m clipvip_jax.index verify` against
damaged and hostile indexes: links out of the folder (files and folders), `..` in part names, offsets and lengths
outside their files, NaN and infinite rows, every malformed field of index.json, invalid UTF-8 and damaged
captions. Each is refused (or, for non-finite rows, never ranked) with one sentence naming the file, and verify
names every problem at once. No model here: the index's rows are made up."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from clipvip_jax import index as index_command
from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.retrieval import exact, search, thumbnails
from clipvip_jax.retrieval.index import read_index, write_index
from clipvip_jax.retrieval.index_checks import IndexDamaged
from clipvip_jax.retrieval.verify import verify_index

META = {"created_by": "test", "kind": "clipvip", "checkpoint": "/nowhere", "step": None, "modality": "video",
        "source": "test"}
ROWS = 6


def _jpeg(seed: int) -> bytes:
  from PIL import Image
  import io
  out = io.BytesIO()
  Image.new("RGB", (8, 4), (seed * 40 % 256, 0, 0)).save(out, format="JPEG")
  return out.getvalue()


def _index(tmp_path: pathlib.Path, name: str = "idx", captions: bool = True) -> pathlib.Path:
  """A 6-row index in parts of 3 with captions and thumbnails."""
  rows = np.random.default_rng(0).standard_normal((ROWS, 4)).astype(np.float32)
  out = tmp_path / name
  write_index(out, rows, [f"clip{i}" for i in range(ROWS)], META, part_rows=3,
              captions=[[f"caption {i}"] for i in range(ROWS)] if captions else None)
  assert thumbnails.write_thumbnails(out, [(f"clip{i}", [_jpeg(i)]) for i in range(ROWS)])
  return out


def _meta(idx: pathlib.Path) -> dict:
  return json.loads((idx / "index.json").read_text())


def _write_meta(idx: pathlib.Path, meta: dict) -> None:
  (idx / "index.json").write_text(json.dumps(meta))


def _set_row(idx: pathlib.Path, part: str, row: int, value: float) -> None:
  emb = np.load(idx / "parts" / part / "embeddings.npy", mmap_mode="r+")
  emb[row] = value
  emb.flush()
  del emb


def _problems(idx: pathlib.Path) -> list[str]:
  report = verify_index(idx)
  assert not report.ok
  return report.problems


def test_a_sound_index_verifies(tmp_path, capsys):
  idx = _index(tmp_path)
  report = verify_index(idx)
  assert report.ok and (report.rows, report.parts) == (ROWS, 2), report.problems
  assert index_command.main(["verify", str(idx)]) == 0
  out = capsys.readouterr().out
  assert "no problem" in out and f"{ROWS} rows in 2 part(s)" in out


# ------------------------------------------------------------------------------------------------ links and names


@pytest.mark.parametrize("target", ["thumbnails/strips.bin", "parts/part-00000/ids.utf8",
                                    "parts/part-00001/embeddings.npy", "index.json",
                                    "parts/part-00000/captions.offsets.npy", "thumbnails/strips.lengths.npy"])
def test_a_file_linked_out_of_the_folder_is_refused(tmp_path, target):
  idx = _index(tmp_path)
  outside = tmp_path / "secret"
  original = idx / target
  outside.write_bytes(original.read_bytes())  # the same bytes: only where it lives is wrong
  original.unlink()
  original.symlink_to(outside)
  with pytest.raises(IndexDamaged, match=f"{target}.* leads outside the index folder"):
    if target.startswith("thumbnails"):
      thumbnails.Thumbnails(idx, ROWS)
    else:
      read_index(idx)
  assert any("leads outside the index folder" in p and target in p for p in _problems(idx))


def test_etc_passwd_as_strips_is_never_served(tmp_path):
  idx = _index(tmp_path)
  (idx / "thumbnails" / "strips.bin").unlink()
  (idx / "thumbnails" / "strips.bin").symlink_to("/etc/passwd")
  with pytest.raises(IndexDamaged, match="strips.bin leads outside the index folder"):
    thumbnails.Thumbnails(idx, ROWS)


def test_a_folder_linked_out_of_the_index_is_refused(tmp_path):
  idx = _index(tmp_path)
  elsewhere = tmp_path / "elsewhere"
  (idx / "parts" / "part-00001").rename(elsewhere)
  (idx / "parts" / "part-00001").symlink_to(elsewhere, target_is_directory=True)
  with pytest.raises(IndexDamaged, match="part-00001 leads outside the index folder"):
    read_index(idx)
  (idx / "thumbnails").rename(tmp_path / "strips")
  (idx / "thumbnails").symlink_to(tmp_path / "strips", target_is_directory=True)
  with pytest.raises(IndexDamaged, match="thumbnails.* leads outside the index folder"):
    thumbnails.Thumbnails(idx, ROWS)
  problems = _problems(idx)
  assert any("part-00001" in p for p in problems) and any("thumbnails" in p for p in problems)


def test_a_link_that_stays_inside_is_fine(tmp_path):
  idx = _index(tmp_path)
  ids = idx / "parts" / "part-00000" / "ids.utf8"
  ids.rename(idx / "parts" / "part-00000" / "real_ids.utf8")
  ids.symlink_to("real_ids.utf8")
  assert read_index(idx).ids[:3] == ["clip0", "clip1", "clip2"] and verify_index(idx).ok


@pytest.mark.parametrize("name", ["../../other/parts/part-00000", "..", "part-00000/../part-00001", "/etc",
                                  ".hidden", "a\\b", "", "x" * 200, 7])
def test_part_names_that_are_paths_are_refused(tmp_path, name):
  idx = _index(tmp_path)
  other = _index(tmp_path, "other")  # what a `..` name would reach
  assert other.is_dir()
  meta = _meta(idx)
  meta["parts"][0]["name"] = name
  _write_meta(idx, meta)
  with pytest.raises(IndexDamaged, match=r"parts\[0\]\.name' is .*not a part folder name"):
    read_index(idx)
  assert len(_problems(idx)) == 1


# ------------------------------------------------------------------------------------------------ offsets, lengths


def _offsets(idx, table="ids", part="part-00000") -> pathlib.Path:
  return idx / "parts" / part / f"{table}.offsets.npy"


@pytest.mark.parametrize("offsets", [[0, -3, 10, 15], [0, 12, 4, 15], [0, 5, 99, 15]])
def test_string_offsets_outside_their_file_are_refused_at_lookup_and_by_verify(tmp_path, offsets):
  idx = _index(tmp_path)
  np.save(_offsets(idx), np.array(offsets, np.int64))
  index = read_index(idx)  # opening checks the ends only (it reads no more than the headers)
  with pytest.raises(IndexDamaged, match="ids.offsets.npy: entry 1 spans bytes .* outside .*ids.utf8"):
    index.id(1)
  assert any("ids.offsets.npy: entry 1 spans" in p for p in _problems(idx))


@pytest.mark.parametrize("offsets,words", [([1, 5, 10, 15], "starts at 1, not 0"), ([0, 5, 10, 99], "offsets end at 99"),
                                           ([0.0, 5.0, 10.0, 15.0], "not integer offsets"),
                                           ([0, 5, 15], "holds 2 entries but the index describes 3")])
def test_string_offsets_that_do_not_fit_the_file_are_refused_at_open(tmp_path, offsets, words):
  idx = _index(tmp_path)
  np.save(_offsets(idx), np.array(offsets))
  with pytest.raises(IndexDamaged, match=words):
    read_index(idx)


@pytest.mark.parametrize("start,length", [(0, -1), (-5, 10), (10 ** 9, 10), (0, 10 ** 9), (3, 5)])
def test_thumbnail_offsets_outside_strips_or_not_jpeg_are_never_served(tmp_path, start, length):
  idx = _index(tmp_path)
  strip_1 = thumbnails.Thumbnails(idx, ROWS).strip(1)
  starts = np.load(idx / "thumbnails" / "strips.starts.npy")
  lengths = np.load(idx / "thumbnails" / "strips.lengths.npy")
  starts[2], lengths[2] = start, length
  np.save(idx / "thumbnails" / "strips.starts.npy", starts)
  np.save(idx / "thumbnails" / "strips.lengths.npy", lengths)
  strips = thumbnails.Thumbnails(idx, ROWS)
  assert strips.strip(2) is None and not strips.has(2)
  assert strips.strip(1) == strip_1 and strip_1[:2] == b"\xff\xd8"  # the others are still served
  assert any("row 2" in p for p in _problems(idx))


def test_thumbnail_arrays_of_the_wrong_shape_or_type_are_refused(tmp_path):
  idx = _index(tmp_path)
  np.save(idx / "thumbnails" / "strips.lengths.npy", np.zeros(3, np.int64))
  with pytest.raises(IndexDamaged, match=r"strips.lengths.npy holds int64 \(3,\), not 6 integer offsets"):
    thumbnails.Thumbnails(idx, ROWS)
  np.save(idx / "thumbnails" / "strips.lengths.npy", np.zeros(ROWS, np.float32))
  with pytest.raises(IndexDamaged, match="not 6 integer offsets"):
    thumbnails.Thumbnails(idx, ROWS)


# ------------------------------------------------------------------------------------------------ NaN and Inf


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("options", [{"threads": 1}, {"threads": 2}, {"on_device": True}])
def test_non_finite_rows_are_never_ranked(tmp_path, value, options):
  idx = _index(tmp_path)
  _set_row(idx, "part-00001", 1, value)  # row 4
  index = read_index(idx)
  queries = np.ones((2, 4), np.float32)
  scores, rows = exact.top_k(index, queries, 300, chunk_rows=2, **options)
  assert rows.shape == (2, ROWS) and (rows[:, -1] == -1).all() and 4 not in rows
  assert np.isfinite(scores[:, :-1]).all()
  good = np.delete(index.embeddings(), 4, axis=0)
  np.testing.assert_allclose(np.sort(scores[0, :-1])[::-1], np.sort(good @ queries[0])[::-1], rtol=1e-5)
  assert any("1 row(s) hold NaN or infinite values (index rows 4)" in p for p in _problems(idx))


def test_an_index_of_nan_rows_ranks_nothing(tmp_path):
  idx = _index(tmp_path)
  for part in ("part-00000", "part-00001"):
    for row in range(3):
      _set_row(idx, part, row, np.nan)
  _, rows = exact.top_k(read_index(idx), np.ones((1, 4), np.float32), 10)
  assert (rows == -1).all()


def test_the_approximate_backend_masks_non_finite_rows_too(tmp_path):
  from clipvip_jax.retrieval import approximate
  rows = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
  write_index(tmp_path / "idx", rows, [str(i) for i in range(200)], META)
  _set_row(tmp_path / "idx", "part-00000", 7, np.nan)
  index = read_index(tmp_path / "idx")
  approximate.build(index, nlist=4, log=lambda line: None)
  scores, found = approximate.search(approximate.load(index), index, rows[7:8].copy(), 300)
  assert 7 not in found and np.isfinite(scores[found >= 0]).all()


def test_write_index_refuses_non_finite_rows(tmp_path):
  rows = np.ones((3, 4), np.float32)
  rows[1, 2] = np.inf
  with pytest.raises(ValueError, match=r"1 row\(s\) hold NaN or infinite values \(first: 'b'\)"):
    write_index(tmp_path / "idx", rows, ["a", "b", "c"], META)
  assert not (tmp_path / "idx").exists()


# ------------------------------------------------------------------------------------------------ index.json fields


@pytest.mark.parametrize("field,value,words", [
    ("parts", None, "field 'parts' must be a list"),
    ("parts", [{"rows": 3}, {"name": "part-00001", "rows": 3}], r"'parts\[0\]' lacks the field 'name'"),
    ("parts", [{"name": "part-00000", "rows": "3"}, {"name": "part-00001", "rows": 3}], r"parts\[0\]\.rows' must be"),
    ("parts", [{"name": "part-00000", "rows": -1}, {"name": "part-00001", "rows": 7}], r"parts\[0\]\.rows' must be"),
    ("parts", [{"name": "part-00000", "rows": 3}, {"name": "part-00000", "rows": 3}], "repeats the part"),
    ("parts", ["part-00000", "part-00001"], r"'parts\[0\]' must be an object"),
    ("dims", "abc", "field 'dims' must be an integer >= 1, not \"abc\""),
    ("dims", 4.0, "field 'dims' must be an integer >= 1, not 4.0"),
    ("count", True, "field 'count' must be an integer >= 0, not true"),
    ("count", 7, "says 7 rows but its parts list 6"),
    ("dtype", "int8", r"field 'dtype' must be one of \['float32', 'float16'\]"),
    ("modality", "audio", "field 'modality' must be one of"),
    ("kind", 3, "field 'kind' must be a non-empty string"),
    ("checkpoint", ["a"], "field 'checkpoint' must be a string"),
    ("step", "3", "field 'step' must be an integer or null"),
    ("options", [], "field 'options' must be an object or null"),
    ("options", {"max_text_len": "long"}, "field 'options.max_text_len' must be an integer >= 1 or null"),
    ("options", {"split": 3}, "field 'options.split' must be a string or null"),
    ("trust_pickle", "yes", "field 'trust_pickle' must be true or false"),
    ("captions", "yes", "field 'captions' must be true or false"),
    ("skipped", [1], "field 'skipped' must be an integer >= 0"),
    ("format_version", "2", "has format version \"2\", which this version of clipvip_jax does not read"),
    ("source", 5, "field 'source' must be a string or null"),
])
def test_each_malformed_field_is_one_sentence_naming_file_and_field(tmp_path, capsys, field, value, words):
  idx = _index(tmp_path)
  _write_meta(idx, {**_meta(idx), field: value})
  with pytest.raises(IndexDamaged, match=words):
    read_index(idx)
  with pytest.raises(SystemExit) as exc:
    index_command.main(["info", str(idx)])
  err = capsys.readouterr().err.strip().splitlines()
  assert exc.value.code == 2 and len(err) == 1 and str(idx / "index.json") in err[0], err
  assert index_command.main(["verify", str(idx)]) == 1
  assert str(idx / "index.json") in capsys.readouterr().out


def test_missing_fields_and_non_objects(tmp_path):
  idx = _index(tmp_path)
  meta = _meta(idx)
  del meta["dims"], meta["kind"]
  _write_meta(idx, meta)
  problems = _problems(idx)  # every problem, not the first
  assert any("lacks the field 'dims'" in p for p in problems) and any("lacks the field 'kind'" in p for p in problems)
  (idx / "index.json").write_text("[1, 2]")
  with pytest.raises(IndexDamaged, match=r"index.json holds \[1, 2\], not a JSON object"):
    read_index(idx)
  (idx / "index.json").write_text("{")
  with pytest.raises(IndexDamaged, match="index.json is not valid JSON"):
    read_index(idx)


def test_a_damaged_part_json_is_named(tmp_path):
  idx = _index(tmp_path)
  (idx / "parts" / "part-00001" / "part.json").write_text('{"skipped": "many"}')
  with pytest.raises(IndexDamaged, match="part-00001/part.json: field 'skipped' must be a list"):
    read_index(idx).skipped()
  assert any("part.json" in p for p in _problems(idx))


# ------------------------------------------------------------------------------------------------ strings


def test_invalid_utf8_ids_are_named_with_file_and_entry(tmp_path):
  idx = _index(tmp_path)
  ids = idx / "parts" / "part-00000" / "ids.utf8"
  data = bytearray(ids.read_bytes())
  data[5] = 0xFF  # clip1's first byte
  ids.write_bytes(bytes(data))
  index = read_index(idx)
  with pytest.raises(IndexDamaged, match=r"part-00000/ids.utf8: entry 1 is not valid UTF-8 .*index verify"):
    index.id(1)
  assert index.id(0) == "clip0"
  assert any("ids.utf8: entry 1 is not valid UTF-8" in p for p in _problems(idx))


def test_damaged_captions_are_named_and_search_prints_nothing_before_the_sentence(tmp_path, monkeypatch, capsys):
  idx = _index(tmp_path)
  captions = idx / "parts" / "part-00001" / "captions.utf8"
  data = captions.read_bytes()
  captions.write_bytes(b"{" + data[1:])  # row 3's list now starts with "{"
  index = read_index(idx)
  with pytest.raises(IndexDamaged, match=r"part-00001/captions.utf8: entry 0 is not a JSON list of captions"):
    index.captions(3)
  assert index.captions(4) == ["caption 4"]
  assert any("captions.utf8: entry 0 is not a JSON list" in p for p in _problems(idx))
  # search: the table is built before anything is printed, so a damaged caption is one sentence, no half table.
  from clipvip_jax import search as search_entry
  from clipvip_jax.retrieval import search_command

  class FakeSearcher:
    def __init__(self, *args, **kwargs):
      self.index, self.approx, self.backend = read_index(idx), None, "exact"
      self.model = type("M", (), {"checkpoint": META["checkpoint"]})()

  monkeypatch.setattr(search_command, "Searcher", FakeSearcher)
  monkeypatch.setattr(search, "encode_queries", lambda model, queries: np.asarray(read_index(idx).rows([3])))
  monkeypatch.setattr(search, "truncation_warnings", lambda model, queries: [])
  with pytest.raises(SystemExit) as exc:
    search_entry.main(["--index", str(idx), "a query", "--top-k", "300"])
  captured = capsys.readouterr()
  assert exc.value.code == 2 and captured.out == ""
  assert len(captured.err.strip().splitlines()) == 1 and "captions.utf8: entry 0" in captured.err


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_search_ranks_around_a_non_finite_row_and_says_so(tmp_path, monkeypatch, capsys, value):
  import warnings
  idx = _index(tmp_path)
  _set_row(idx, "part-00000", 2, value)
  from clipvip_jax import search as search_entry
  from clipvip_jax.retrieval import search_command

  class FakeSearcher:
    def __init__(self, *args, **kwargs):
      self.index, self.approx, self.backend = read_index(idx), None, "exact"
      self.model = type("M", (), {"checkpoint": META["checkpoint"]})()

  monkeypatch.setattr(search_command, "Searcher", FakeSearcher)
  monkeypatch.setattr(search, "encode_queries", lambda model, queries: np.ones((len(queries), 4), np.float32))
  monkeypatch.setattr(search, "truncation_warnings", lambda model, queries: [])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert search_entry.main(["--index", str(idx), "red circle", "--top-k", "300", "--json"]) == 0
  assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]  # no numpy warnings with source lines
  captured = capsys.readouterr()
  results = json.loads(captured.out)[0]["results"]
  assert len(results) == ROWS - 1 and "clip2" not in [r["id"] for r in results]
  assert "only 5 of the 6 results asked for could be ranked" in captured.err and "Warning" not in captured.err


def test_the_index_trust_pickle_field_is_not_honoured(tmp_path, monkeypatch):
  """An index must not be able to make search unpickle a file: load_model never gets trust_pickle from it."""
  from clipvip_jax.retrieval import model as model_lib
  idx = _index(tmp_path)
  checkpoint = tmp_path / "evil.pt"
  checkpoint.write_bytes(b"not really")
  _write_meta(idx, {**_meta(idx), "trust_pickle": True, "checkpoint": str(checkpoint)})
  seen = {}

  def fake_load(path, config=None, step=None, trust_pickle=False):
    seen["trust_pickle"] = trust_pickle
    raise UsageError("stop here")

  monkeypatch.setattr(model_lib, "load_model", fake_load)
  with pytest.raises(UsageError, match="stop here"):
    search.Searcher(idx)
  assert seen == {"trust_pickle": False}


def test_verify_names_every_problem_at_once_and_exits_1(tmp_path, capsys):
  idx = _index(tmp_path)
  _set_row(idx, "part-00000", 0, np.inf)
  np.save(_offsets(idx, part="part-00001"), np.array([0, 5, 99, 15], np.int64))
  (idx / "thumbnails" / "strips.bin").write_bytes(b"x" * 10)  # shorter than its offsets say
  os.symlink("/etc", idx / "elsewhere")
  assert index_command.main(["verify", str(idx)]) == 1
  out = capsys.readouterr().out
  for words in ("row(s) hold NaN or infinite values (index rows 0)", "part-00001/ids.offsets.npy: entry 1 spans",
                "strips.bin (10 bytes)", "elsewhere leads outside the index folder"):
    assert words in out, (words, out)
  assert "problems    " in out
