"""`python -m hmoe.data`: download WikiText and/or report the word counts of its splits."""

from __future__ import annotations

import argparse
import logging

from hmoe.data.wikitext import (
  DATASETS,
  DEFAULT_DATA_ENV,
  SPLITS,
  count_words,
  download_wikitext,
  resolve_data_dir,
  wikitext_split_path,
)


def _main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m hmoe.data",
                                   description="Download WikiText and/or report the word counts of its splits.")
  parser.add_argument("--download", action="store_true", help="fetch the official archive")
  parser.add_argument("--dataset", default="wikitext-2", choices=DATASETS)
  parser.add_argument("--data_dir", default=None, help=f"data root (default: ${DEFAULT_DATA_ENV} or ../shared/data)")
  parser.add_argument("--url", default=None, help="archive URL override (file:// works)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  if args.download:
    if args.data_dir is None:
      parser.error("--download needs --data_dir")
    download_wikitext(args.data_dir, args.dataset, args.url)
  data_dir = resolve_data_dir(args.data_dir)
  for split in SPLITS:
    try:
      path = wikitext_split_path(data_dir, args.dataset, split)
    except (FileNotFoundError, ValueError) as e:
      print(f"{args.dataset} {split}: {e}")
      continue
    print(f"{args.dataset} {split}: {count_words(path):,} words ({path})")


if __name__ == "__main__":
  _main()
