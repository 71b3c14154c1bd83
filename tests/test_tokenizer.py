"""CLIP tokenizer: parity with the original on MSR-VTT 1k-A, and the original's rules on hand cases."""

import csv
import json

import numpy as np
import pytest

from clipvip_jax import tokenizer


def _msrvtt_sentences(shared_data_dir):
  with open(shared_data_dir / "MSRVTT_JSFUSION_test.csv", newline="", encoding="utf-8") as handle:
    return [row["sentence"] for row in csv.DictReader(handle)]


def test_msrvtt_1ka_matches_original(shared_data_dir, fixtures_dir):
  sentences = _msrvtt_sentences(shared_data_dir)
  expected = np.load(fixtures_dir / "msrvtt_1ka_test_tokens.npz")
  assert len(sentences) == expected["ids"].shape[0] == 1000
  ids, mask = tokenizer.tokenize(sentences, max_len=77)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (1000, 77)
  differing = [sentences[i] for i in np.flatnonzero((ids != expected["ids"]).any(axis=1))]
  assert not differing, f"{len(differing)} sentences differ, first: {differing[:5]}"
  lengths = [len(bpe) for bpe in tokenizer.encode_bpe(sentences)]
  np.testing.assert_array_equal(lengths, expected["untruncated_lengths"])
  assert (tokenizer.SOT_ID, tokenizer.EOT_ID) == (int(expected["sot"]), int(expected["eot"]))
  # The mask covers exactly start..end.
  ends = np.minimum(lengths, 75) + 1
  np.testing.assert_array_equal(mask, np.arange(77)[None, :] <= ends[:, None])
  np.testing.assert_array_equal(ids[np.arange(1000), ends], tokenizer.EOT_ID)


def test_truncation_keeps_start_and_end():
  text = "a man is playing a guitar while a woman sings on a stage in front of a crowd"
  (full,) = tokenizer.encode_bpe(text)
  assert len(full) > 6
  ids, mask = tokenizer.tokenize(text, max_len=8)
  np.testing.assert_array_equal(ids[0], [tokenizer.SOT_ID, *full[:6], tokenizer.EOT_ID])
  np.testing.assert_array_equal(mask[0], np.ones(8))
  ids, mask = tokenizer.tokenize(text, max_len=2)
  np.testing.assert_array_equal(ids[0], [tokenizer.SOT_ID, tokenizer.EOT_ID])


def test_empty_and_padding():
  ids, mask = tokenizer.tokenize(["", "   \t\n", "dog"], max_len=6)
  np.testing.assert_array_equal(ids[0], [tokenizer.SOT_ID, tokenizer.EOT_ID, 0, 0, 0, 0])
  np.testing.assert_array_equal(ids[1], ids[0])
  np.testing.assert_array_equal(mask[:2], [[1, 1, 0, 0, 0, 0]] * 2)
  (dog,) = tokenizer.encode_bpe("dog")
  assert len(dog) == 1  # a common word is one merged token
  np.testing.assert_array_equal(ids[2], [tokenizer.SOT_ID, dog[0], tokenizer.EOT_ID, 0, 0, 0])
  np.testing.assert_array_equal(mask[2], [1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize(
  "messy, clean",
  [
    ("A MAN Is Cooking", "a man is cooking"),  # lower-cased
    ("tom &amp;amp; jerry &lt;3 &#39;cartoon&#39;", "tom & jerry <3 'cartoon'"),  # HTML unescaped twice
    ("  a\tdog\n\u00a0 runs\u3000fast\r\n ", "a dog runs fast"),  # whitespace collapsed and stripped
    ("a caf\u00c3\u00a9 that doesn\u2019t close", "a caf\u00e9 that doesn't close"),  # ftfy: mojibake, curly quote
    ("a\u0345b", "a b"),  # the original's case-insensitive pattern matches U+0345 nowhere, so drops it
  ],
)
def test_text_cleanup(messy, clean):
  np.testing.assert_array_equal(tokenizer.tokenize(messy)[0], tokenizer.tokenize(clean)[0])


def test_special_token_text_is_the_special_token():
  # The original's word pattern starts with the two special tokens, so their literal text maps to their ids.
  (ids,) = tokenizer.encode_bpe("a <|endoftext|> b")
  assert ids == [*tokenizer.encode_bpe("a")[0], tokenizer.EOT_ID, *tokenizer.encode_bpe("b")[0]]


def test_single_string_and_cached_builder():
  ids, mask = tokenizer.tokenize("a dog", max_len=77)
  assert ids.shape == mask.shape == (1, 77)
  assert tokenizer.get_tokenizer() is tokenizer.get_tokenizer()
  # transformers' tokenizer alone agrees on plain lower-case text.
  assert tokenizer.get_tokenizer()("a dog")["input_ids"] == list(ids[0, :4])


def test_bad_input_raises():
  with pytest.raises(ValueError, match="max_len"):
    tokenizer.tokenize("a dog", max_len=1)
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tokenizer.tokenize(["a dog", None])


def _write_vocab_dir(path, num_merges):
  """A checkpoint-style folder: vocab.json + merges.txt of CLIP's first `num_merges` merges."""
  vocab, merges = tokenizer._shipped_vocab_and_merges()
  kept = {token: index for token, index in vocab.items() if index < 512 + num_merges}
  kept.update({"<|startoftext|>": 512 + num_merges, "<|endoftext|>": 513 + num_merges})
  (path / "vocab.json").write_text(json.dumps(kept), encoding="utf-8")
  lines = ["#version: 0.2", *(" ".join(pair) for pair in merges[:num_merges])]
  (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_tokenizer_dir_with_vocab_and_merges(tmp_path):
  text = "A person is Connecting something to the system."
  _write_vocab_dir(tmp_path, len(tokenizer._shipped_vocab_and_merges()[1]))
  np.testing.assert_array_equal(tokenizer.tokenize(text, tokenizer_dir=tmp_path)[0], tokenizer.tokenize(text)[0])

  # A smaller vocabulary: its own start/end ids, and fewer merges, so more and smaller pieces.
  small_dir = tmp_path / "small"
  small_dir.mkdir()
  _write_vocab_dir(small_dir, 300)
  ids, mask = tokenizer.tokenize(text, tokenizer_dir=small_dir)
  length = int(mask.sum())
  assert ids[0, 0] == 812 and ids[0, length - 1] == 813
  assert 1 < length and (ids[0, 1 : length - 1] < 812).all()
  assert length > int(tokenizer.tokenize(text)[1].sum())


def test_tokenizer_dir_with_tokenizer_json(tmp_path):
  tokenizer.get_tokenizer().backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
  text = "Two &amp; a half MEN"
  np.testing.assert_array_equal(tokenizer.tokenize(text, tokenizer_dir=tmp_path)[0], tokenizer.tokenize(text)[0])


def test_tokenizer_dir_without_files_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tokenizer.tokenize("a dog", tokenizer_dir=tmp_path)


@pytest.mark.parametrize("vocab_size", [None, 300])
def test_the_bpe_is_transformers_clip_tokenizers_own(tmp_path, vocab_size):
  """The word encoder, built directly with `tokenizers` (no transformers import), is the BPE model, special tokens
  and decoder of transformers' CLIPTokenizer for the same vocabulary, field for field, beside the pre-tokenizer the
  original's word split needs."""
  folder = None
  if vocab_size is not None:
    folder = tmp_path
    _write_vocab_dir(folder, vocab_size)
  theirs = json.loads(tokenizer.get_tokenizer(folder).backend_tokenizer.to_str())
  theirs.update(normalizer=None, post_processor=None,
                pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
  assert json.loads(tokenizer._word_encoder(folder).to_str()) == theirs


def test_tokenizing_does_not_import_transformers():
  import subprocess
  import sys
  code = ("import sys; from clipvip_jax import tokenizer; ids, _ = tokenizer.tokenize(['a dog', 'Two &amp; MEN']); "
          "print(ids[0, :4].tolist(), 'transformers' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split("]")[1].split() == ["False"] and r.stdout.startswith("[49406, 320, 1929, 49407")
