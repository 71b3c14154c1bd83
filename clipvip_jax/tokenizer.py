"""CLIP's BPE text tokenizer: the original's clean-up and id layout, with the BPE run by Hugging Face tokenizers.

The originals (OpenAI CLIP's `simple_tokenizer`, used unchanged by CLIP-ViP and CLIP2Video) turn a caption
into `[start] + BPE ids[:max_len - 2] + [end]`, zero padded to `max_len`, after cleaning the text with ftfy,
a double HTML unescape, whitespace collapsing and lower-casing. The clean-up and the split into words are
reproduced here in Python with the original's libraries (ftfy, `regex`), exactly; the byte-level BPE of the
words is delegated to the BPE model of transformers' `CLIPTokenizer` (Rust, batched), built here directly with
`tokenizers`: importing transformers costs every command that tokenizes (and each of its data workers) about 2 s
of start-up, so only `get_tokenizer` does (tests/test_tokenizer.py checks the two BPE models are the same).

The vocabulary ships as `assets/bpe_simple_vocab_16e6.txt.gz` (see assets/README.md); the vocab/merges are
derived from it in memory on first use.
"""

import functools
import gzip
import html
import json
import pathlib
from collections.abc import Sequence

import ftfy
import numpy as np
import regex
import tokenizers

SOT_ID = 49406  # <|startoftext|>
EOT_ID = 49407  # <|endoftext|>

_BPE_MERGES_GZ = pathlib.Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses only the first 48894 merges of the file (it reads lines [1, 49152 - 256 - 2]), so that
# 512 byte symbols + 48894 merges + 2 specials = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
_START_TOKEN = "<|startoftext|>"
_END_TOKEN = "<|endoftext|>"
# The original uses the `regex` module (imported there as `re`) for both patterns, and IGNORECASE for words.
_WHITESPACE_RUN = regex.compile(r"\s+")
_PRE_TOKEN = regex.compile(
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def _bytes_to_unicode() -> dict[int, str]:
  """CLIP's (GPT-2's) reversible byte -> printable character table, in CLIP's vocabulary order.

  Bytes that are already visible Latin-1 characters map to themselves and come first (so '!' is id 0); the
  other 68 (controls, space, soft hyphen...) follow in byte order, mapped to U+0100 upward.
  """
  visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table = {byte: chr(byte) for byte in visible}
  next_code = 256
  for byte in range(256):
    if byte not in table:
      table[byte] = chr(next_code)
      next_code += 1
  return table


def _merge_pair(merge: str | Sequence[str], where: str) -> tuple[str, str]:
  """One merge: 'left right' (merges.txt) or ['left', 'right'] (newer tokenizer.json)."""
  pair = merge.split() if isinstance(merge, str) else list(merge)
  if len(pair) != 2 or not all(isinstance(symbol, str) for symbol in pair):
    raise ValueError(f"{where}: not a merge pair: {merge!r}")
  return pair[0], pair[1]


@functools.lru_cache(maxsize=1)
def _shipped_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The vocabulary CLIP builds from its merges file, in CLIP's id order.

  Ids: the 256 byte symbols, the same 256 with the end-of-word marker `</w>`, one id per merge (the merged
  pair concatenated), then <|startoftext|> (49406) and <|endoftext|> (49407).
  """
  if not _BPE_MERGES_GZ.is_file():
    raise FileNotFoundError(f"CLIP BPE vocabulary missing: {_BPE_MERGES_GZ} (it ships with clipvip_jax/assets)")
  with gzip.open(_BPE_MERGES_GZ, "rt", encoding="utf-8") as handle:
    lines = handle.read().split("\n")[1 : _NUM_MERGES + 1]  # line 0 is the "#version" header
  merges = [_merge_pair(line, f"{_BPE_MERGES_GZ} line {number}") for number, line in enumerate(lines, start=2)]
  byte_symbols = list(_bytes_to_unicode().values())
  tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols] + ["".join(pair) for pair in merges]
  tokens += [_START_TOKEN, _END_TOKEN]
  vocab = {token: index for index, token in enumerate(tokens)}
  if len(vocab) != len(tokens) or vocab[_END_TOKEN] != EOT_ID:
    raise ValueError(f"{_BPE_MERGES_GZ}: does not give CLIP's 49408 distinct tokens")
  return vocab, merges


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error})") from error


def _checkpoint_vocab_and_merges(tokenizer_dir: pathlib.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocab and merges of a checkpoint folder: vocab.json + merges.txt, else the BPE model of tokenizer.json."""
  vocab_file, merges_file = tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"
  tokenizer_file = tokenizer_dir / "tokenizer.json"
  if vocab_file.is_file() and merges_file.is_file():
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [
      _merge_pair(line, f"{merges_file} line {number}")
      for number, line in enumerate(lines, start=1)
      if line.strip() and not (number == 1 and line.startswith("#version"))
    ]
    vocab = _read_json(vocab_file)
    if not isinstance(vocab, dict):
      raise ValueError(f"{vocab_file}: expected a JSON object token -> id")
    return vocab, merges
  if tokenizer_file.is_file():
    model = _read_json(tokenizer_file).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or "merges" not in model:
      raise ValueError(f"{tokenizer_file}: field 'model' is not a BPE model with 'vocab' and 'merges'")
    merges = [_merge_pair(merge, f"{tokenizer_file} model.merges[{i}]") for i, merge in enumerate(model["merges"])]
    return model["vocab"], merges
  raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} holds neither vocab.json + merges.txt nor tokenizer.json")


def vocab_and_merges(tokenizer_dir: str | pathlib.Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The BPE vocabulary {token: id} and merge list `get_tokenizer` builds on (None: the shipped one)."""
  if tokenizer_dir is None:
    return _shipped_vocab_and_merges()
  return _checkpoint_vocab_and_merges(pathlib.Path(tokenizer_dir))


@functools.lru_cache(maxsize=8)
def get_tokenizer(tokenizer_dir: str | pathlib.Path | None = None) -> "transformers.CLIPTokenizer":  # noqa: F821
  """transformers' CLIP tokenizer, built once per folder (None: the vocabulary shipped in clipvip_jax/assets).

  Called directly it applies transformers' own light clean-up, not the original's; `tokenize` gives the
  original's ids.
  """
  import transformers
  vocab, merges = _checked_vocab_and_merges(tokenizer_dir)
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _checked_vocab_and_merges(tokenizer_dir) -> tuple[dict[str, int], list[tuple[str, str]]]:
  vocab, merges = vocab_and_merges(tokenizer_dir)
  for token in (_START_TOKEN, _END_TOKEN):
    if token not in vocab:
      raise ValueError(f"vocabulary of {tokenizer_dir or _BPE_MERGES_GZ} has no {token} token")
  return vocab, merges


@functools.lru_cache(maxsize=8)
def _word_encoder(tokenizer_dir: str | pathlib.Path | None) -> tokenizers.Tokenizer:
  """The BPE of `get_tokenizer`, fed with words the original's way: no normaliser, no splitting of its own.

  transformers' pre-tokenizer uses the same pattern as the original but through another regex engine
  (other Unicode tables, and no IGNORECASE: the original drops U+0345, for example), so words are split in
  Python with the original's library and flags, and here only mapped to byte symbols.
  """
  vocab, merges = _checked_vocab_and_merges(tokenizer_dir)
  # CLIPTokenizer's BPE model and special tokens, as transformers builds them.
  encoder = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=merges, unk_token=_END_TOKEN, continuing_subword_prefix="", end_of_word_suffix="</w>",
      fuse_unk=False))
  encoder.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)
                              for token in (_START_TOKEN, _END_TOKEN)])
  encoder.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  encoder.decoder = tokenizers.decoders.ByteLevel()
  return encoder


def clean_text(text: str) -> str:
  """The original's clean-up: ftfy, HTML unescaped twice, strip, whitespace runs -> one space, strip, lower."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE_RUN.sub(" ", text).strip().lower()


@functools.lru_cache(maxsize=1 << 16)
def _words(text: str) -> tuple[str, ...]:
  """The original's pre-tokens of a text. Cached: ftfy dominates the cost, and epochs repeat captions."""
  return tuple(_PRE_TOKEN.findall(clean_text(text)))


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
  if isinstance(texts, str):
    return [texts]
  texts = list(texts)
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"tokenize: texts[{index}] is {type(text).__name__}, expected str")
  return texts


def encode_bpe(texts: str | Sequence[str], tokenizer_dir: str | pathlib.Path | None = None) -> list[list[int]]:
  """BPE ids of each cleaned text, without start/end tokens and without truncation."""
  words = [list(_words(text)) for text in _as_text_list(texts)]
  encodings = _word_encoder(tokenizer_dir).encode_batch(words, is_pretokenized=True, add_special_tokens=False)
  return [encoding.ids for encoding in encodings]


def tokenize(
  texts: str | Sequence[str], max_len: int = 77, tokenizer_dir: str | pathlib.Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask, int32 [N, max_len], laid out as the original CLIP tokenizer does.

  Row = [start] + BPE ids truncated to max_len - 2 + [end], then zeros; mask is 1 from start to end inclusive.
  The end token is kept after truncation, as the CLIP text tower pools at the first end token.
  """
  if max_len < 2:
    raise ValueError(f"tokenize: max_len={max_len} leaves no room for the start and end tokens (need >= 2)")
  encoder = _word_encoder(tokenizer_dir)  # built once per folder: the vocabulary is not read again per call
  start, end = encoder.token_to_id(_START_TOKEN), encoder.token_to_id(_END_TOKEN)
  bpe_ids = encode_bpe(texts, tokenizer_dir)
  ids = np.zeros((len(bpe_ids), max_len), np.int32)
  mask = np.zeros((len(bpe_ids), max_len), np.int32)
  for row, sentence_ids in enumerate(bpe_ids):
    body = sentence_ids[: max_len - 2]
    ids[row, 0] = start
    ids[row, 1 : 1 + len(body)] = body
    ids[row, 1 + len(body)] = end
    mask[row, : 2 + len(body)] = 1
  return ids, mask


MAX_QUERY_CHARS = 10_000  # ~30x what 77 tokens hold: longer is a file pasted by mistake, not a query


def truncation_notes(texts: str | Sequence[str], max_len: int, tokenizer_dir: str | pathlib.Path | None = None,
                  *, what: str = "query") -> list[str]:
  """What tokenize() would cut from user-typed texts, one warning each; ValueError for an absurd length.

  Training captions are cut silently, as the originals do; a search query that loses its end changes the answer,
  so search and encode --texts state it ("query 2 has 95 tokens; only the first 75 are used (max_text_len 77):
  '... the words cut'"). A text of more than MAX_QUERY_CHARS characters is refused before tokenizing it.
  """
  notes = []
  texts = _as_text_list(texts)
  for index, text in enumerate(texts, start=1):
    if len(text) > MAX_QUERY_CHARS:
      raise ValueError(f"{what} {index} is {len(text)} characters long; the model reads at most {max_len - 2} "
                       f"tokens (a few hundred characters), so more than {MAX_QUERY_CHARS} is refused")
  for index, (text, ids) in enumerate(zip(texts, encode_bpe(texts, tokenizer_dir)), start=1):
    if len(ids) > max_len - 2:
      cut = get_tokenizer(tokenizer_dir).decode(ids[max_len - 2:]).strip()
      shown = cut if len(cut) <= 60 else cut[:57] + "..."
      notes.append(f"{what} {index} has {len(ids)} tokens; only the first {max_len - 2} are used (max_text_len "
                   f"{max_len}), so {shown!r} is ignored")
  return notes
