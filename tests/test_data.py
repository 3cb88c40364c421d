"""Tests for hmoe.data: file lookup, word counts, download, encoding cache, batching."""

import hashlib
import pathlib
import zipfile

import numpy as np
import pytest

from hmoe.data import __main__ as data_cli, batching, tokenizer as tok_lib, wikitext as data

# Blank lines, a heading, <unk> and @-@ as in WikiText.
_SAMPLE = (
    " \n"
    " = Heading = \n"
    " \n"
    " Some text @-@ here <unk> . \n"
    " \n"
)
# Lines: " " -> 1, " = Heading = " -> 3 + 1, " " -> 1, 6 words + 1, " " -> 1.
_SAMPLE_WORDS = 1 + 4 + 1 + 7 + 1

_OFFICIAL_WIKITEXT2_WORDS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}


def _write_wikitext_dir(root: pathlib.Path, dataset: str = "wikitext-2") -> pathlib.Path:
  (root / dataset).mkdir(parents=True)
  for split in data.SPLITS:
    (root / dataset / f"wiki.{split}.tokens").write_text(_SAMPLE * 3, encoding="utf-8")
  return root


# ----------------------------------------------------------------------------
# Locating files and counting words.
# ----------------------------------------------------------------------------


def test_count_words_hand_made(tmp_path):
  path = tmp_path / "wiki.test.tokens"
  path.write_text(_SAMPLE, encoding="utf-8")
  assert data.count_words(path) == _SAMPLE_WORDS
  # A last line without "\n" still counts; "\r" is not a line separator.
  path.write_text(" a b \n c", encoding="utf-8")
  assert data.count_words(path) == 3 + 2
  path.write_text(" a \r b \n", encoding="utf-8")
  assert data.count_words(path) == 3


def test_official_wikitext2_word_counts():
  try:
    data_dir = data.resolve_data_dir()
  except FileNotFoundError:
    pytest.skip("no shared data directory")
  for split, expected in _OFFICIAL_WIKITEXT2_WORDS.items():
    path = data.wikitext_split_path(data_dir, "wikitext-2", split)
    assert data.count_words(path) == expected, split


def test_resolve_data_dir_order(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DEFAULT_DATA_ENV, str(tmp_path / "from_env"))
  assert data.resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
  assert data.resolve_data_dir() == tmp_path / "from_env"

  monkeypatch.delenv(data.DEFAULT_DATA_ENV)
  shared = tmp_path / "shared" / "data"
  shared.mkdir(parents=True)
  (tmp_path / "work").mkdir()
  monkeypatch.chdir(tmp_path / "work")
  assert data.resolve_data_dir() == shared.resolve()


def test_without_any_data_dir_the_cache_is_used_and_offline_fetching_explains_options(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DEFAULT_DATA_ENV, raising=False)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "repo")
  assert data.resolve_data_dir() == data.DEFAULT_CACHE_DIR
  with pytest.raises(FileNotFoundError) as e:  # The conftest makes every download fail as offline.
    data.ensure_wikitext(tmp_path / "cache", "wikitext-2")
  for hint in ("wiki.train.tokens", "could not be downloaded", "--data_dir", data.DEFAULT_DATA_ENV,
               "python -m hmoe.data --download --dataset=wikitext-2"):
    assert hint in str(e.value)
  assert not (tmp_path / "cache" / "wikitext-2" / "wiki.train.tokens").exists()


def test_first_use_downloads_and_verifies_the_archive(tmp_path, monkeypatch):
  members = {f"wikitext-2/wiki.{s}.tokens": f" = {s} = \n{_SAMPLE}" for s in data.SPLITS}
  url = _make_zip(tmp_path / "mirror.zip", members)
  pins = {("wikitext-2", s): hashlib.sha256(f" = {s} = \n{_SAMPLE}".encode()).hexdigest() for s in data.SPLITS}
  with pytest.raises(ValueError, match="has SHA-256 .* expected 9e9fa1ad"):  # Official pins: a foreign archive fails.
    data.ensure_wikitext(tmp_path / "a", "wikitext-2", url=url)
  assert not (tmp_path / "a" / "wikitext-2" / "wiki.train.tokens").exists()
  monkeypatch.setattr(data, "WIKITEXT_SHA256", pins)
  monkeypatch.setattr(data, "WIKITEXT_URLS", {"wikitext-2": url})
  target = data.ensure_wikitext(tmp_path / "b", "wikitext-2")
  assert (target / "wiki.valid.tokens").read_text() == f" = valid = \n{_SAMPLE}"
  (tmp_path / "mirror.zip").unlink()  # Present files are not fetched again.
  assert data.ensure_wikitext(tmp_path / "b", "wikitext-2") == target


def test_wikitext_split_path(tmp_path):
  root = _write_wikitext_dir(tmp_path)
  assert data.wikitext_split_path(root, "wikitext-2", "valid") == (
      root / "wikitext-2" / "wiki.valid.tokens")
  with pytest.raises(ValueError, match="wikitext-7"):
    data.wikitext_split_path(root, "wikitext-7", "train")
  with pytest.raises(ValueError, match="'dev'"):
    data.wikitext_split_path(root, "wikitext-2", "dev")
  missing = root / "wikitext-103" / "wiki.train.tokens"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    data.wikitext_split_path(root, "wikitext-103", "train")


@pytest.mark.parametrize("content", ["", " \n \n\n"])
def test_wikitext_split_path_rejects_empty_file(tmp_path, content):
  root = _write_wikitext_dir(tmp_path)
  path = root / "wikitext-2" / "wiki.test.tokens"
  path.write_text(content)
  with pytest.raises(ValueError, match=str(path)):
    data.wikitext_split_path(root, "wikitext-2", "test")


# ----------------------------------------------------------------------------
# Download.
# ----------------------------------------------------------------------------


def _make_zip(path: pathlib.Path, members: dict[str, str]) -> str:
  with zipfile.ZipFile(path, "w") as zf:
    for name, text in members.items():
      zf.writestr(name, text)
  return path.as_uri()


def test_download_wikitext_from_file_url(tmp_path, capsys, monkeypatch):
  members = {f"wikitext-2/wiki.{s}.tokens": f" = {s} = \n{_SAMPLE}" for s in data.SPLITS}
  monkeypatch.setattr(data, "WIKITEXT_SHA256", {("wikitext-2", s): hashlib.sha256(
      members[f"wikitext-2/wiki.{s}.tokens"].encode()).hexdigest() for s in data.SPLITS})
  members["wikitext-2/README"] = "not extracted"
  url = _make_zip(tmp_path / "wikitext-2-v1.zip", members)
  root = tmp_path / "data"
  target = data.download_wikitext(root, "wikitext-2", url=url)
  assert target == root / "wikitext-2"
  assert sorted(p.name for p in target.iterdir()) == sorted(
      f"wiki.{s}.tokens" for s in data.SPLITS)
  for s in data.SPLITS:
    assert data.wikitext_split_path(root, "wikitext-2", s).read_text() == members[
        f"wikitext-2/wiki.{s}.tokens"]
  assert [p.name for p in root.iterdir()] == ["wikitext-2"]  # Temp dir cleaned up.

  # The CLI downloads the same way, then reports word counts.
  data_cli._main(["--download", f"--data_dir={tmp_path / 'cli'}", f"--url={url}"])
  assert f"{_SAMPLE_WORDS + 4:,} words" in capsys.readouterr().out


def test_download_rejects_incomplete_archive(tmp_path):
  url = _make_zip(tmp_path / "bad.zip", {"wikitext-2/wiki.train.tokens": _SAMPLE})
  root = tmp_path / "data"
  with pytest.raises(ValueError, match="wiki.valid.tokens"):
    data.download_wikitext(root, "wikitext-2", url=url)
  assert list((root / "wikitext-2").iterdir()) == []  # Nothing half-installed.
  with pytest.raises(ValueError, match="wikitext-5"):
    data.download_wikitext(root, "wikitext-5", url=url)


# ----------------------------------------------------------------------------
# Encoding and its cache.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_file(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("split") / "wiki.train.tokens"
  rng = np.random.default_rng(0)
  words = "the of and game city <unk> @-@ @,@ , . = school state was known".split()
  lines = [_SAMPLE]
  for _ in range(150):
    lines.append(" " + " ".join(rng.choice(words, size=rng.integers(2, 15))) + " \n")
    if rng.random() < 0.3:
      lines.append(" \n")
  path.write_text("".join(lines), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def tok(split_file) -> tok_lib.Tokenizer:
  return tok_lib.train_tokenizer(split_file, vocab_size=280)


def test_load_split_encodes_lines_with_eos(tok, split_file):
  split = data.load_split(tok, split_file)
  tokens = split.tokens
  assert tokens.dtype == np.int32 and tokens.ndim == 1
  assert split.num_words == data.count_words(split_file)
  assert split.path == str(split_file)
  lines = split_file.read_text(encoding="utf-8").split("\n")[:-1]
  eos_positions = np.flatnonzero(tokens == tok.eos_id)
  assert len(eos_positions) == len(lines) and eos_positions[-1] == len(tokens) - 1
  starts = np.concatenate([[0], eos_positions[:-1] + 1])
  for line, start, end in zip(lines, starts, eos_positions):
    assert tok.decode(tokens[start:end].tolist()) == " ".join(line.split())
  assert tokens[0] == tok.eos_id  # The first line is blank: just eos.


def test_load_split_cache(tok, split_file, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  first = data.load_split(tok, split_file, cache_dir=cache)
  assert len(list(cache.iterdir())) == 1

  def _fail(lines):
    raise AssertionError("cache hit expected, but the split was re-encoded")

  with monkeypatch.context() as m:
    m.setattr(tok, "encode_batch", _fail)
    again = data.load_split(tok, split_file, cache_dir=cache)
  np.testing.assert_array_equal(again.tokens, first.tokens)
  assert again.num_words == first.num_words

  # A different tokenizer misses the cache and gets its own entry.
  other_tok = tok_lib.train_tokenizer(split_file, vocab_size=300)
  other = data.load_split(other_tok, split_file, cache_dir=cache)
  assert len(list(cache.iterdir())) == 2
  assert len(other.tokens) < len(first.tokens)  # More merges, fewer tokens.
  assert data.load_split(other_tok, split_file).tokens.tolist() == other.tokens.tolist()


def test_damaged_token_cache_is_named_and_rebuilt(tok, split_file, tmp_path, caplog):
  cache = tmp_path / "cache"
  first = data.load_split(tok, split_file, cache_dir=cache)
  (cache_file,) = cache.iterdir()
  raw = cache_file.read_bytes()
  for damaged in (raw[: len(raw) // 2], raw[:-40] + bytes(40)):  # Truncated; corrupted in place (same size).
    cache_file.write_bytes(damaged)
    caplog.clear()
    again = data.load_split(tok, split_file, cache_dir=cache)
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert str(cache_file) in caplog.text and "re-encoding" in caplog.text
    assert cache_file.read_bytes() == raw  # Rewritten whole.


def test_invalid_utf8_names_file_line_and_offset(tmp_path):
  path = tmp_path / "wiki.train.tokens"
  path.write_bytes(b" = A = \n the cat \n sat \xff on \n")
  for read in (data.count_words, lambda p: tok_lib.train_tokenizer(p, vocab_size=300)):
    with pytest.raises(ValueError, match=rf"{path}: invalid UTF-8 at line 3, byte offset 23 .*b'\\xff'"):
      read(path)


def test_load_split_cache_invalidated_by_file_change(tok, tmp_path):
  path = tmp_path / "wiki.valid.tokens"
  path.write_text(_SAMPLE)
  cache = tmp_path / "cache"
  before = data.load_split(tok, path, cache_dir=cache)
  path.write_text(_SAMPLE + " the city \n")
  after = data.load_split(tok, path, cache_dir=cache)
  assert len(after.tokens) > len(before.tokens)
  assert after.num_words == _SAMPLE_WORDS + 3


# ----------------------------------------------------------------------------
# Training batches.
# ----------------------------------------------------------------------------

# Token value == position, so a window's tokens reveal where it starts.
_STREAM = np.arange(10 * 8 + 5, dtype=np.int32)  # 10 windows of seq_len 8 (+1), 5 spare.
_L = 8
_NUM_WINDOWS = 10


def _window_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
  return batch["inputs"][:, 0] // _L


def test_train_batch_shapes_and_shift():
  batch = batching.train_batch(_STREAM, step=3, batch_size=4, seq_len=_L, seed=0)
  assert set(batch) == {"inputs", "targets"}
  for value in batch.values():
    assert value.shape == (4, _L) and value.dtype == np.int32
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
  # Windows start at multiples of seq_len and are contiguous.
  assert (batch["inputs"][:, 0] % _L == 0).all()
  np.testing.assert_array_equal(np.diff(batch["inputs"], axis=1), 1)


def test_train_batch_deterministic_and_resumable():
  run = [batching.train_batch(_STREAM, s, 3, _L, seed=7) for s in range(12)]
  batching._epoch_order.cache_clear()  # As in a freshly started process.
  for step in (0, 5, 11):
    resumed = batching.train_batch(_STREAM, step, 3, _L, seed=7)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(resumed[key], run[step][key])
  assert not np.array_equal(run[0]["inputs"], run[1]["inputs"])
  assert any(not np.array_equal(batching.train_batch(_STREAM, s, 3, _L, seed=8)["inputs"],
                                run[s]["inputs"]) for s in range(4))


def test_train_batch_epochs_visit_every_window_once():
  batch_size = 3  # Does not divide 10 windows: batches straddle epoch boundaries.
  num_steps = -(-3 * _NUM_WINDOWS // batch_size)
  visited = np.concatenate([
      _window_ids(batching.train_batch(_STREAM, s, batch_size, _L, seed=1))
      for s in range(num_steps)])
  for epoch in range(3):
    order = visited[epoch * _NUM_WINDOWS:(epoch + 1) * _NUM_WINDOWS]
    np.testing.assert_array_equal(
        order, np.random.default_rng([1, epoch]).permutation(_NUM_WINDOWS))
    assert sorted(order) == list(range(_NUM_WINDOWS))
  assert not np.array_equal(visited[:_NUM_WINDOWS], visited[_NUM_WINDOWS:2 * _NUM_WINDOWS])


def test_train_batch_rejects_short_split_and_bad_args():
  with pytest.raises(ValueError, match="batch_size=11"):
    batching.train_batch(_STREAM, 0, batch_size=11, seq_len=_L, seed=0)
  with pytest.raises(ValueError, match="step"):
    batching.train_batch(_STREAM, -1, batch_size=2, seq_len=_L, seed=0)
  with pytest.raises(ValueError, match="1-D"):
    batching.train_batch(_STREAM.reshape(5, 17), 0, batch_size=1, seq_len=_L, seed=0)


# ----------------------------------------------------------------------------
# Evaluation batches.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,batch_size,seq_len", [
    (1, 2, 4), (7, 2, 4), (8, 2, 4), (9, 2, 4), (16, 2, 4), (17, 3, 5), (100, 4, 16),
])
def test_eval_batches_cover_every_token_once(num_tokens, batch_size, seq_len):
  eos = 0
  tokens = np.arange(1, num_tokens + 1, dtype=np.int32)  # Never equal to eos.
  batches = list(batching.eval_batches(tokens, batch_size, seq_len, eos_id=eos))
  assert len(batches) == batching.num_eval_batches(num_tokens, batch_size, seq_len)
  for batch in batches:
    assert set(batch) == {"inputs", "targets", "weights"}
    for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)):
      assert batch[key].shape == (batch_size, seq_len) and batch[key].dtype == dtype
  weights = np.concatenate([b["weights"].ravel() for b in batches])
  targets = np.concatenate([b["targets"].ravel() for b in batches])
  inputs = np.concatenate([b["inputs"].ravel() for b in batches])
  assert weights.sum() == num_tokens
  real = weights == 1
  assert set(np.unique(weights)) <= {0.0, 1.0}
  np.testing.assert_array_equal(targets[real], tokens)  # Each exactly once, in order.
  np.testing.assert_array_equal(inputs[real], np.concatenate([[eos], tokens[:-1]]))
  # Within a window, input t+1 is target t (next-token prediction).
  windows_in = inputs.reshape(-1, seq_len)
  windows_tg = targets.reshape(-1, seq_len)
  windows_w = weights.reshape(-1, seq_len)
  both_real = (windows_w[:, 1:] == 1)
  np.testing.assert_array_equal(windows_in[:, 1:][both_real], windows_tg[:, :-1][both_real])


def test_eval_batches_real_split_weight_sum(tok, split_file):
  tokens = data.load_split(tok, split_file).tokens
  batches = batching.eval_batches(tokens, batch_size=3, seq_len=32, eos_id=tok.eos_id)
  assert sum(b["weights"].sum() for b in batches) == len(tokens)


def test_eval_batches_rejects_empty():
  with pytest.raises(ValueError, match="empty"):
    batching.eval_batches(np.zeros(0, np.int32), 2, 4, eos_id=1)  # Raises before iterating.
