"""Tests for hmoe.tokenizer: WikiText conventions, round trip, save/load, caching."""

import pathlib

import numpy as np
import pytest
import tokenizers

from hmoe.data import tokenizer as tok_lib, wikitext as data

_WORDS = (
    "the of and in to was a is for on as with by he that at from his it an were "
    "which are this also be had first one their its new after but who not they "
    "have her she two been other when there all during into school time may "
    "years more most only over city some world would where later up such used "
    "many can state about national out known university united then made"
).split()

_FIXED_LINES = [
    " \n",
    " = Valkyria Chronicles III = \n",
    " \n",
    " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) \n",
    " The game 's role @-@ playing , 1 @,@ 000 units and 3 @.@ 5 points . \n",
    " <unk> <unk> began in 2010 , carrying over a large portion of the work <unk> \n",
    " = = Gameplay = = \n",
    " \n",
]


def _write_corpus(path: pathlib.Path, num_lines: int = 200, seed: int = 0) -> list[str]:
  """A made-up WikiText-like file; returns its lines (with newlines)."""
  rng = np.random.default_rng(seed)
  lines = list(_FIXED_LINES)
  for _ in range(num_lines):
    words = rng.choice(_WORDS + ["<unk>", "@-@", ",", "."], size=rng.integers(3, 20))
    lines.append(" " + " ".join(words) + " \n")
    if rng.random() < 0.2:
      lines.append(" \n")
  path.write_text("".join(lines), encoding="utf-8")
  return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
  path = tmp_path_factory.mktemp("corpus") / "wiki.train.tokens"
  return path, _write_corpus(path)


@pytest.fixture(scope="module")
def tok(corpus) -> tok_lib.Tokenizer:
  return tok_lib.train_tokenizer(corpus[0], vocab_size=320)


def test_special_token_ids(tok):
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  hf = tok.hf_tokenizer
  assert [hf.id_to_token(i) for i in range(3)] == ["<pad>", "<eos>", "<unk>"]
  assert tok.vocab_size == 320


def test_round_trip_on_corpus_lines(tok, corpus):
  lines = corpus[1]
  for line, ids in zip(lines, tok.encode_batch([l.strip() for l in lines])):
    assert tok.decode(ids) == " ".join(line.split()), line


@pytest.mark.parametrize("text", [
    "a <unk> b",
    "<unk> at the start",
    "at the end <unk>",
    "<unk> <unk> <unk>",
    "  extra   spaces\tand tabs  ",
    "unseen characters : naïve 東京 € 🙂 ½",
    "= = Heading = =",
    "",
])
def test_round_trip_normalises_whitespace(tok, text):
  assert tok.decode(tok.encode(text)) == " ".join(text.split())


def test_unk_is_one_atomic_token(tok):
  ids = tok.encode("a <unk> b")
  assert ids.count(tok.unk_id) == 1
  # The space before <unk> is folded into it: no lone-space token.
  assert len(ids) == 3, [tok.hf_tokenizer.id_to_token(i) for i in ids]
  assert tok.encode("<unk> <unk>") == [tok.unk_id, tok.unk_id]
  # Words merely containing "unk" are not the marker.
  assert tok.unk_id not in tok.encode("sunk unknown")


def test_eos_never_produced_from_text_and_decode_skips_pad_eos(tok):
  text = "the city was first known as a school ."
  ids = tok.encode(text)
  assert tok.eos_id not in ids and tok.pad_id not in ids
  assert tok.decode([tok.pad_id, *ids, tok.eos_id, tok.pad_id]) == text
  assert max(ids) < tok.vocab_size


def test_encode_batch_matches_encode(tok, corpus):
  lines = [l.strip() for l in corpus[1][:20]]
  assert tok.encode_batch(lines) == [tok.encode(l) for l in lines]


def test_save_load_keeps_fingerprint_and_encoding(tok, tmp_path):
  path = tmp_path / "sub" / "tok.json"
  tok.save(path)
  loaded = tok_lib.Tokenizer.load(path)
  assert loaded.fingerprint == tok.fingerprint
  assert loaded.vocab_size == tok.vocab_size
  text = "the <unk> university @-@ state"
  assert loaded.encode(text) == tok.encode(text)
  assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # No temp files left.


def test_fingerprint_depends_on_vocab(tok, corpus):
  other = tok_lib.train_tokenizer(corpus[0], vocab_size=300)
  assert other.fingerprint != tok.fingerprint


def test_load_or_train_uses_cache(corpus, tmp_path, monkeypatch):
  cache = tmp_path / "tok.json"
  first = tok_lib.load_or_train_tokenizer(corpus[0], 300, cache)
  mtime = cache.stat().st_mtime_ns

  def _fail(*args, **kwargs):
    raise AssertionError("cache hit expected, but the tokenizer was retrained")

  with monkeypatch.context() as m:
    m.setattr(tok_lib, "train_tokenizer", _fail)
    second = tok_lib.load_or_train_tokenizer(corpus[0], 300, cache)
  assert second.fingerprint == first.fingerprint
  assert cache.stat().st_mtime_ns == mtime

  # A different vocab size invalidates the cache.
  third = tok_lib.load_or_train_tokenizer(corpus[0], 320, cache)
  assert third.vocab_size == 320
  assert tok_lib.Tokenizer.load(cache).fingerprint == third.fingerprint != first.fingerprint


def test_load_or_train_replaces_corrupt_cache(corpus, tmp_path):
  cache = tmp_path / "tok.json"
  cache.write_text("not json")
  tok = tok_lib.load_or_train_tokenizer(corpus[0], 300, cache)
  assert tok_lib.Tokenizer.load(cache).fingerprint == tok.fingerprint


def test_vocab_size_too_small(corpus):
  with pytest.raises(ValueError, match="vocab_size=100"):
    tok_lib.train_tokenizer(corpus[0], vocab_size=100)


def test_missing_files_name_the_path(tmp_path):
  missing = tmp_path / "nope.tokens"
  with pytest.raises(FileNotFoundError, match="nope.tokens"):
    tok_lib.train_tokenizer(missing, vocab_size=300)
  with pytest.raises(FileNotFoundError, match="nope.tokens"):
    tok_lib.Tokenizer.load(missing)


def test_rejects_tokenizer_without_special_ids():
  hf = tokenizers.Tokenizer(tokenizers.models.BPE())
  with pytest.raises(ValueError, match="<pad>"):
    tok_lib.Tokenizer(hf)


def test_round_trip_on_real_wikitext():
  """Trains on WikiText-2 valid (fast) and round-trips valid and test."""
  try:
    data_dir = data.resolve_data_dir()
  except FileNotFoundError:
    pytest.skip("no shared data directory")
  tok = tok_lib.train_tokenizer(data.wikitext_split_path(data_dir, "wikitext-2", "valid"), 1024)
  for split in ("valid", "test"):
    path = data.wikitext_split_path(data_dir, "wikitext-2", split)
    lines = path.read_text(encoding="utf-8").split("\n")
    encoded = tok.encode_batch(lines)
    bad = [l for l, ids in zip(lines, encoded) if tok.decode(ids) != " ".join(l.split())]
    assert not bad, f"{len(bad)} {split} lines fail the round trip, first: {bad[0]!r}"
    unk_lines = [(l, ids) for l, ids in zip(lines, encoded) if "<unk>" in l]
    assert unk_lines
    for line, ids in unk_lines:
      assert ids.count(tok.unk_id) == line.split().count("<unk>")

