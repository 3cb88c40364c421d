"""WikiText files: locating, downloading, word counting, encoding and the encoded-split cache.

Conventions (standard WikiText): a split file is a sequence of lines ending in "\\n"; every line, empty ones
included, counts as `line.split() + ["<eos>"]` words, and the encoded token stream has one `<eos>` id after every
line. Word-level perplexity is exp(total NLL over the split / `count_words`), comparable with published results.
Batching lives in `hmoe.data.batching`; the command line (`python -m hmoe.data`) in `hmoe.data.__main__`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import tqdm

DEFAULT_DATA_ENV = "HMOE_DATA_DIR"
DATASETS = ("wikitext-2", "wikitext-103")
SPLITS = ("train", "valid", "test")
WIKITEXT_URLS = {
    "wikitext-2": "https://wikitext.smerity.com/wikitext-2-v1.zip",
    "wikitext-103": "https://wikitext.smerity.com/wikitext-103-v1.zip",
}
# SHA-256 of the official split files (byte-identical to the release archives); a download is verified against them.
# WikiText-103's train split is not pinned (no verified copy was at hand): it is extracted unverified, with a warning.
WIKITEXT_SHA256 = {
    ("wikitext-2", "train"): "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    ("wikitext-2", "valid"): "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    ("wikitext-2", "test"): "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    ("wikitext-103", "valid"): "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b",
    ("wikitext-103", "test"): "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9",
}
# Where data goes when no data directory exists yet (first use on a fresh machine).
DEFAULT_CACHE_DIR = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "hmoe" / "data"
# The directory holding the hmoe package: a checkout's root.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Bump when the cached array layout or encoding convention changes.
_CACHE_FORMAT_VERSION = 2

PathLike = str | os.PathLike[str]


class _LineTokenizer(Protocol):
  """What `load_split` needs from `hmoe.tokenizer.Tokenizer`."""

  @property
  def eos_id(self) -> int: ...

  @property
  def fingerprint(self) -> str: ...

  def encode_batch(self, lines: list[str]) -> list[list[int]]: ...


# ----------------------------------------------------------------------------
# Locating and downloading the files.
# ----------------------------------------------------------------------------


def resolve_data_dir(data_dir: PathLike | None = None) -> pathlib.Path:
  """Returns the data root holding `wikitext-2/` and `wikitext-103/`.

  Order: `data_dir` if given; else $HMOE_DATA_DIR; else the first existing of `./../shared/data` and
  `<repo root>/../shared/data`; else `DEFAULT_CACHE_DIR` (~/.cache/hmoe/data), where a first run downloads to.
  """
  if data_dir is not None:
    return pathlib.Path(data_dir)
  from_env = os.environ.get(DEFAULT_DATA_ENV)
  if from_env:
    return pathlib.Path(from_env)
  candidates = [pathlib.Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
  for candidate in candidates:
    if candidate.is_dir():
      return candidate.resolve()
  return DEFAULT_CACHE_DIR


def ensure_wikitext(data_dir: PathLike, dataset: str, splits=SPLITS, url: str | None = None) -> pathlib.Path:
  """`<data_dir>/<dataset>`, downloading (and verifying) the archive first if any of `splits` is missing.

  Offline (or when the download fails), raises `FileNotFoundError` with one paragraph naming the flag, the
  environment variable and the download command; nothing is written outside `data_dir`.
  """
  _check_dataset(dataset)
  target = pathlib.Path(data_dir) / dataset
  missing = [split for split in splits if not (target / f"wiki.{split}.tokens").is_file()]
  if not missing:
    return target
  logging.warning("%s %s not found in %s: downloading %s", dataset, "/".join(missing), target,
                  url or WIKITEXT_URLS[dataset])
  try:
    return download_wikitext(data_dir, dataset, url)
  except OSError as error:  # urllib's URLError (offline, DNS, HTTP) and file errors are OSErrors.
    raise FileNotFoundError(
        f"WikiText file {target / f'wiki.{missing[0]}.tokens'} is missing and {dataset} could not be downloaded "
        f"({type(error).__name__}: {error}). Point hmoe at a folder holding {dataset}/wiki.{{train,valid,test}}.tokens "
        f"with --data_dir=DIR (or --config.data.data_dir=DIR, or ${DEFAULT_DATA_ENV}=DIR), or fetch it on a machine "
        f"with network: python -m hmoe.data --download --dataset={dataset} --data_dir=DIR") from None


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def wikitext_split_path(data_dir: PathLike, dataset: str, split: str) -> pathlib.Path:
  """Path of `<data_dir>/<dataset>/wiki.<split>.tokens`, checked to exist and be non-empty."""
  _check_dataset(dataset)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  path = pathlib.Path(data_dir) / dataset / f"wiki.{split}.tokens"
  if not path.is_file():
    raise FileNotFoundError(f"WikiText file not found: {path}. Fetch it with "
                            f"`python -m hmoe.data --download --dataset={dataset} --data_dir={data_dir}`.")
  if _is_blank(path):
    raise ValueError(f"WikiText file is empty (no non-whitespace text): {path}")
  return path


def _is_blank(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      if chunk.strip():
        return False
  return True


def download_wikitext(data_dir: PathLike, dataset: str, url: str | None = None,
                      checksums: Mapping[tuple[str, str], str] | None = None) -> pathlib.Path:
  """Fetches an official WikiText archive and extracts its `wiki.*.tokens` files.

  Args:
    data_dir: Data root; files land in `<data_dir>/<dataset>/`.
    dataset: "wikitext-2" or "wikitext-103".
    url: Archive URL (any scheme urllib handles, file:// included); defaults to the official smerity.com zip.
    checksums: {(dataset, split): SHA-256} the extracted files must have; default `WIKITEXT_SHA256`.

  Returns:
    `<data_dir>/<dataset>`. Existing split files there are replaced. Each file appears atomically (extracted into a
    temp dir, then renamed), so an interrupted download never leaves a truncated split behind.
  """
  _check_dataset(dataset)
  url = url or WIKITEXT_URLS[dataset]
  target = pathlib.Path(data_dir) / dataset
  target.mkdir(parents=True, exist_ok=True)
  # The temp dir sits beside the target so the final renames stay on one filesystem.
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{dataset}-download-") as tmp:
    tmp_dir = pathlib.Path(tmp)
    archive = tmp_dir / "archive.zip"
    logging.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
      total = int(response.headers.get("Content-Length") or 0) or None
      with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"{dataset}", disable=not sys.stderr.isatty()) as bar:
        while chunk := response.read(1 << 20):
          out.write(chunk)
          bar.update(len(chunk))
    extracted = _extract_split_files(archive, tmp_dir / "extracted", url)
    _verify(tmp_dir / "extracted", dataset, url, WIKITEXT_SHA256 if checksums is None else checksums)
    for name in extracted:
      os.replace(tmp_dir / "extracted" / name, target / name)
  logging.info("wrote %s to %s", ", ".join(extracted), target)
  return target


def _verify(directory: pathlib.Path, dataset: str, url: str, checksums: Mapping[tuple[str, str], str]) -> None:
  """Checks every extracted split against its pinned SHA-256 before anything replaces the data."""
  for split in SPLITS:
    expected = checksums.get((dataset, split))
    if expected is None:
      logging.warning("%s %s has no pinned SHA-256; extracted unverified", dataset, split)
      continue
    actual = hashlib.sha256((directory / f"wiki.{split}.tokens").read_bytes()).hexdigest()
    if actual != expected:
      raise ValueError(f"wiki.{split}.tokens from {url} has SHA-256 {actual}, expected {expected} (the official "
                       f"{dataset} file): a damaged or different archive; nothing was written")


def _extract_split_files(archive: pathlib.Path, out_dir: pathlib.Path, url: str) -> list[str]:
  """Extracts `wiki.{train,valid,test}.tokens` (by base name only) into out_dir."""
  wanted = {f"wiki.{split}.tokens" for split in SPLITS}
  out_dir.mkdir()
  try:
    zf = zipfile.ZipFile(archive)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{url} is not a zip archive: {e}") from e
  found = []
  with zf:
    for info in zf.infolist():
      # Only the base name is used, so a hostile member path cannot escape out_dir.
      name = pathlib.PurePosixPath(info.filename).name
      if name in wanted and not info.is_dir():
        with zf.open(info) as src, open(out_dir / name, "wb") as dst:
          shutil.copyfileobj(src, dst)
        found.append(name)
    if sorted(found) != sorted(wanted):
      raise ValueError(f"archive {url} lacks {sorted(wanted - set(found))}; members: {zf.namelist()[:20]}")
  return sorted(found)


# ----------------------------------------------------------------------------
# Word counts and encoding.
# ----------------------------------------------------------------------------


def decode_text(raw: bytes, path: PathLike) -> str:
  """`raw` decoded as UTF-8; invalid bytes raise a ValueError naming the file, the line and the byte offset."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as error:
    line = raw.count(b"\n", 0, error.start) + 1
    raise ValueError(f"{path}: invalid UTF-8 at line {line}, byte offset {error.start} ({error.reason}, "
                     f"byte {raw[error.start:error.start + 1]!r}); WikiText files are UTF-8") from None


def _split_lines(raw: bytes, path: PathLike) -> list[str]:
  # Only "\n" separates lines (str.splitlines would also split on \x1c, \u2028, ...), and a final "\n" does not
  # start another line: this reproduces the official counts.
  lines = decode_text(raw, path).split("\n")
  if lines[-1] == "":
    lines.pop()
  return lines


def _count_words_in_lines(lines: list[str]) -> int:
  return sum(len(line.split()) + 1 for line in lines)


def count_words(path: PathLike) -> int:
  """Number of WikiText words in a file: whitespace tokens plus one `<eos>` per line.

  Every line counts, empty ones included, which reproduces the official counts (WikiText-2 train 2,088,628 /
  valid 217,646 / test 245,569).
  """
  return _count_words_in_lines(_split_lines(pathlib.Path(path).read_bytes(), path))


@dataclasses.dataclass(frozen=True, eq=False)
class SplitTokens:
  """One encoded split.

  Attributes:
    tokens: int32 [N], the whole split, one eos id after every line.
    num_words: `count_words` of the file, the denominator of word-level perplexity.
    path: The source file.
  """

  tokens: np.ndarray
  num_words: int
  path: str


def load_split(tokenizer: _LineTokenizer, path: PathLike, cache_dir: PathLike | None = None) -> SplitTokens:
  """Encodes a split file line by line, appending the eos id after each line.

  Args:
    tokenizer: An `hmoe.tokenizer.Tokenizer` (anything with `encode_batch`, `eos_id` and `fingerprint`).
    path: A WikiText-style file; empty lines encode to just eos.
    cache_dir: If given, the int32 array is cached there as `<file name>.<key>.npz` with its SHA-256, the key hashing
      the file's size and contents and the tokenizer fingerprint, so a changed file or tokenizer misses the cache; a
      truncated or corrupted cache file is named in a warning and re-encoded.

  Returns:
    SplitTokens with tokens int32 [N].
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"split file not found: {path}")
  raw = path.read_bytes()
  lines = _split_lines(raw, path)
  num_words = _count_words_in_lines(lines)
  cache_file = None
  if cache_dir is not None:
    key = hashlib.sha256()
    key.update(f"v{_CACHE_FORMAT_VERSION}:{len(raw)}:{tokenizer.fingerprint}:".encode())
    key.update(raw)
    cache_file = pathlib.Path(cache_dir) / f"{path.name}.{key.hexdigest()[:16]}.npz"
    if cache_file.is_file():
      tokens = _load_cache(cache_file)
      if tokens is not None:
        return SplitTokens(tokens=tokens, num_words=num_words, path=str(path))
  tokens = _encode_lines(tokenizer, lines)
  if cache_file is not None:
    _save_cache_atomic(cache_file, tokens)
  return SplitTokens(tokens=tokens, num_words=num_words, path=str(path))


def _encode_lines(tokenizer: _LineTokenizer, lines: list[str]) -> np.ndarray:
  """int32 [N]: the lines' ids, each line followed by eos."""
  eos = (tokenizer.eos_id,)
  encoded = tokenizer.encode_batch([line.strip() for line in lines])
  return np.array([i for ids in encoded for i in (*ids, *eos)], dtype=np.int32)


def _digest(tokens: np.ndarray) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).digest(), np.uint8)


def _load_cache(path: pathlib.Path) -> np.ndarray | None:
  """The cached tokens, or None (with a warning naming the file) if the file is truncated or fails its digest."""
  try:
    with np.load(path) as cached:
      tokens, digest = cached["tokens"], cached["sha256"]
  except Exception as error:  # np.load raises many types on a damaged file (ValueError, EOFError, BadZipFile, ...).
    logging.warning("token cache %s is unreadable (%s: %s); re-encoding it", path, type(error).__name__, error)
    return None
  if not np.array_equal(digest, _digest(tokens)):
    logging.warning("token cache %s fails its SHA-256 check; re-encoding it", path)
    return None
  return tokens


def _save_cache_atomic(path: pathlib.Path, tokens: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, tokens=tokens, sha256=_digest(tokens))
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
