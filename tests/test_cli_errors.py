"""Bad input to encode and search: one sentence on stderr, exit status 2, no traceback; and run_cli itself."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import retrieval_helpers as rh
from clipvip_jax import encode, search
from clipvip_jax.runtime import cli_errors
from clipvip_jax.runtime.cli_errors import UsageError, run_cli
from data_pipelines import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ run_cli


def _raiser(error):
  def main(argv):
    raise error
  return main


def _expect_exit(capsys, fn, code: int = 2) -> str:
  """Runs fn(), expects SystemExit(code) and exactly one stderr line; returns that line."""
  with pytest.raises(SystemExit) as exc:
    fn()
  assert exc.value.code == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert "Traceback" not in err[0]
  return err[0]


def test_run_cli_returns_the_status_of_a_good_run():
  assert run_cli(lambda argv: None, [], prog="p") == 0
  assert run_cli(lambda argv: 3, [], prog="p") == 3


@pytest.mark.parametrize("error, message", [
    (UsageError("--index x does not exist"), "p: error: --index x does not exist"),
    (ValueError("first line\n  second line"), "p: error: first line second line"),
    (FileNotFoundError(2, "No such file or directory", "/no/such"), "p: error: /no/such: No such file or directory"),
])
def test_run_cli_turns_input_errors_into_one_sentence(capsys, error, message):
  assert _expect_exit(capsys, lambda: run_cli(_raiser(error), [], prog="p")) == message


def test_run_cli_interrupt_exits_130(capsys):
  assert _expect_exit(capsys, lambda: run_cli(_raiser(KeyboardInterrupt()), [], prog="p"), 130) == "p: interrupted"


def test_run_cli_lets_bugs_through_with_their_traceback():
  with pytest.raises(TypeError):
    run_cli(_raiser(TypeError("a bug")), [], prog="p")


def test_run_cli_debug_variable_shows_the_traceback(monkeypatch):
  monkeypatch.setenv(cli_errors.DEBUG_ENV, "1")
  with pytest.raises(UsageError):
    run_cli(_raiser(UsageError("bad")), [], prog="p")


# ------------------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A tiny checkpoint, a second one with another embedding size, shards, a text file and a built index."""
  root = tmp_path_factory.mktemp("inputs")
  ckpt = rh.write_tiny_clipvip(root / "clipvip")
  other = rh.write_tiny_clipvip(root / "clipvip16", projection_dim=16)
  shards = root / "shards"
  synthetic.generate(str(shards), 20, seed=0)
  texts = root / "texts.txt"
  texts.write_text("a red circle\n", encoding="utf-8")
  index = root / "index"
  assert encode.main(["--checkpoint", str(ckpt), "--shards", str(shards), "--split", "test", "--out", str(index),
                      "--quiet"]) == 0
  text_index = root / "text_index"
  assert encode.main(["--checkpoint", str(ckpt), "--texts", str(texts), "--out", str(text_index), "--quiet"]) == 0
  empty_dir = root / "empty"
  empty_dir.mkdir()
  return {"ckpt": ckpt, "other": other, "shards": shards, "texts": texts, "index": index,
          "text_index": text_index, "empty_dir": empty_dir, "root": root}


def _encode_argv(inputs, tmp_path, *extra, source=None):
  source = source or ["--texts", str(inputs["texts"])]
  return ["--checkpoint", str(inputs["ckpt"]), *source, "--out", str(tmp_path / "out"), "--quiet", *extra]


def test_help_of_both_commands(capsys):
  for main, words in ((encode.main, "--videos"), (search.main, "--top-k")):
    with pytest.raises(SystemExit) as exc:
      main(["--help"])
    assert exc.value.code == 0
    assert words in capsys.readouterr().out


def test_encode_missing_checkpoint(capsys, inputs, tmp_path):
  argv = _encode_argv(inputs, tmp_path)
  argv[1] = str(tmp_path / "nope")
  line = _expect_exit(capsys, lambda: encode.main(argv))
  assert line == f"python -m clipvip_jax.encode: error: checkpoint {tmp_path / 'nope'} does not exist"


def test_encode_checkpoint_folder_that_is_no_checkpoint(capsys, inputs, tmp_path):
  argv = _encode_argv(inputs, tmp_path)
  argv[1] = str(inputs["empty_dir"])
  assert "is neither a converted checkpoint" in _expect_exit(capsys, lambda: encode.main(argv))


def test_encode_unreadable_checkpoint_file(capsys, inputs, tmp_path):
  junk = tmp_path / "model.pt"
  junk.write_bytes(b"\x00garbage" * 50)
  argv = _encode_argv(inputs, tmp_path)
  argv[1] = str(junk)
  assert "is not a readable PyTorch checkpoint" in _expect_exit(capsys, lambda: encode.main(argv))


def test_encode_damaged_converted_checkpoint(capsys, inputs, tmp_path):
  damaged = tmp_path / "damaged"
  shutil.copytree(inputs["ckpt"], damaged)
  for item in (damaged / "params").iterdir():
    shutil.rmtree(item) if item.is_dir() else item.unlink()
  argv = _encode_argv(inputs, tmp_path)
  argv[1] = str(damaged)
  line = _expect_exit(capsys, lambda: encode.main(argv))
  assert str(damaged) in line


def test_encode_config_with_a_converted_checkpoint(capsys, inputs, tmp_path):
  config = tmp_path / "config.json"
  config.write_text("{}")
  line = _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, "--config", str(config))))
  assert "already carries its model config" in line


def test_encode_checkpoint_and_config_that_disagree(capsys, inputs, tmp_path, fixtures_dir):
  config = json.loads((fixtures_dir / "clipvip_tiny_config.json").read_text())
  config["clip_config"]["vision_config"]["num_attention_heads"] = 3  # the weights' width is 64
  bad = tmp_path / "config.json"
  bad.write_text(json.dumps(config))
  argv = _encode_argv(inputs, tmp_path, "--config", str(bad))
  argv[1] = str(fixtures_dir / "clipvip_tiny.pt")
  assert "not divisible by 3 heads" in _expect_exit(capsys, lambda: encode.main(argv))


def test_encode_missing_config_file(capsys, inputs, tmp_path):
  line = _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, "--config", "/no/cfg.json")))
  assert line.endswith("config file /no/cfg.json does not exist")


@pytest.mark.parametrize("source, message", [
    (["--videos", "/no/videos"], "--videos /no/videos does not exist"),
    (["--shards", "/no/shards"], "shard folder /no/shards does not exist"),
    (["--texts", "/no/texts.txt"], "--texts /no/texts.txt does not exist"),
])
def test_encode_missing_inputs(capsys, inputs, tmp_path, source, message):
  assert _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, source=source))).endswith(message)


def test_encode_folder_without_videos(capsys, inputs, tmp_path):
  line = _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path,
                                                               source=["--videos", str(inputs["empty_dir"])])))
  assert line.endswith("holds no video files or frame folders")


def test_encode_unknown_split(capsys, inputs, tmp_path):
  source = ["--shards", str(inputs["shards"]), "--split", "valid"]
  line = _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, source=source)))
  assert "has no split 'valid'" in line


def test_encode_empty_text_file(capsys, inputs, tmp_path):
  blank = tmp_path / "blank.txt"
  blank.write_text("\n   \n")
  line = _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, source=["--texts", str(blank)])))
  assert line.endswith("holds no text (one text per line)")


def test_encode_existing_output(capsys, inputs, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "precious.txt").write_text("keep me")
  assert "already exists" in _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path)))
  line = _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, "--force")))
  assert "refusing to replace it" in line
  assert (tmp_path / "out" / "precious.txt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--image-size", "224"], "--image-size 224 does not fit the model (clipvip), which takes 32x32 frames"),
    (["--max-text-len", "77"], "--max-text-len 77 must be in 2..16 (the model's text positions)"),
])
def test_encode_options_that_do_not_fit_the_model(capsys, inputs, tmp_path, extra, message):
  assert _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, *extra))).endswith(message)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0 (see --help)"),
    (["--num-frames", "x"], "argument --num-frames: 'x' is not an integer (see --help)"),
])
def test_encode_bad_numbers(capsys, inputs, tmp_path, argv, message):
  line = _expect_exit(capsys, lambda: encode.main(_encode_argv(inputs, tmp_path, *argv)))
  assert line.endswith(message)


def test_encode_needs_one_source(capsys, tmp_path):
  line = _expect_exit(capsys, lambda: encode.main(["--checkpoint", "c", "--out", str(tmp_path / "o")]))
  assert "one of the arguments --videos --shards --texts is required" in line


def test_failed_encode_leaves_no_output(inputs, tmp_path):
  with pytest.raises(SystemExit):
    encode.main(_encode_argv(inputs, tmp_path, "--image-size", "224"))
  assert not (tmp_path / "out").exists()
  assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ search


def _search(capsys, *argv) -> str:
  return _expect_exit(capsys, lambda: search.main(list(argv)))


def test_search_missing_index(capsys, tmp_path):
  assert _search(capsys, "--index", str(tmp_path / "none"), "q").endswith(f"index directory {tmp_path / 'none'} "
                                                                         "does not exist")


def test_search_index_folder_missing_files(capsys, inputs, tmp_path):
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(inputs["index"] / "index.json", partial / "index.json")
  assert "part-00000 is missing (the index is incomplete" in _search(capsys, "--index", str(partial), "q")


def test_search_embeddings_that_disagree_with_the_index(capsys, inputs, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(inputs["index"], broken)
  np.save(broken / "parts" / "part-00000" / "embeddings.npy", np.zeros((2, 7), np.float32))
  assert "has shape (2, 7) but" in _search(capsys, "--index", str(broken), "q")


def test_search_empty_query_and_bad_top_k(capsys, inputs):
  assert _search(capsys, "--index", str(inputs["index"]), "  ").endswith("query 1 is empty")
  assert _search(capsys, "--index", str(inputs["index"]), "q", "--top-k", "0").endswith(
      "--top-k must be an integer >= 1, got 0")


def test_search_with_a_checkpoint_of_another_size(capsys, inputs):
  line = _search(capsys, "--index", str(inputs["index"]), "q", "--checkpoint", str(inputs["other"]))
  assert "holds 32-dim embeddings but checkpoint" in line and "gives 16-dim ones" in line


def test_search_a_text_index(capsys, inputs):
  assert "holds text embeddings; search needs a video index" in _search(capsys, "--index",
                                                                         str(inputs["text_index"]), "q")


def test_search_when_the_recorded_checkpoint_is_gone(capsys, inputs, tmp_path):
  moved = tmp_path / "moved"
  shutil.copytree(inputs["index"], moved)
  meta = json.loads((moved / "index.json").read_text())
  meta["checkpoint"] = str(tmp_path / "gone")
  (moved / "index.json").write_text(json.dumps(meta))
  assert _search(capsys, "--index", str(moved), "q").endswith("does not exist; pass --checkpoint")


def test_search_library_raises_usage_errors(inputs):
  with pytest.raises(UsageError, match="--top-k must be an integer >= 1"):
    search.search(inputs["index"], "q", top_k=-1)
  with pytest.raises(UsageError, match="no query given"):
    search.search(inputs["index"], [])


def test_a_real_process_prints_one_line_and_exits_2(inputs):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  env.pop(cli_errors.DEBUG_ENV, None)
  result = subprocess.run([sys.executable, "-m", "clipvip_jax.search", "--index", str(inputs["text_index"]),
                           "a query"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("python -m clipvip_jax.search: error: ")
  assert "holds text embeddings" in lines[-1]
  assert "Traceback" not in result.stderr
