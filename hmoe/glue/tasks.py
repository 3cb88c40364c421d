"""The GLUE tasks hmoe fine-tunes on: their files, columns, labels and metrics, and readers for them.

Each `Task` names how its GLUE TSVs are laid out (as in the official GLUE release: `glue_data/<Task>/{train,dev}.tsv`,
MNLI with `dev_matched.tsv` and `dev_mismatched.tsv`) and `read_split(task, split, data_dir)` turns one file into
`Example`s. Rows are checked as they are read: a row with the wrong number of fields, an unknown label or a score that
is not a number raises `GlueFormatError` naming the file and the line, so a truncated download is found at once and not
trained on.

`read_tfds_split` is the optional second input path: tensorflow-datasets' `glue/<config>` builder (when it is installed
and has the data), mapped to the same `Example`s, so everything downstream is shared.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

PathLike = str | os.PathLike[str]


class GlueFormatError(ValueError):
  """A GLUE file that does not have the layout of its task (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Example:
  text_a: str
  text_b: str | None  # None for single-sentence tasks.
  label: int | float  # Class index, or the similarity score (STS-B).


@dataclasses.dataclass(frozen=True)
class Task:
  """One GLUE task. Column indices count from 0; -1 is the last column (STS-B's score, MNLI's gold label)."""

  name: str
  directory: str
  splits: Mapping[str, str]  # split name -> file name.
  num_columns: int  # Fields per row; 0 = at least max(text and label columns) + 1 (MNLI's dev files have more).
  text_columns: tuple[int, ...]
  label_column: int
  labels: tuple[str, ...] = ()  # The label strings in class-index order; () = a regression score.
  has_header: bool = True
  metrics: tuple[str, ...] = ("accuracy",)
  tfds_name: str = ""
  tfds_text_keys: tuple[str, ...] = ()

  @property
  def is_regression(self) -> bool:
    return not self.labels

  @property
  def num_outputs(self) -> int:
    return 1 if self.is_regression else len(self.labels)

  @property
  def primary_metric(self) -> str:
    """The metric the results table sorts by and "best dev" means (GLUE's first metric of the task)."""
    return self.metrics[0]


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {task.name: task for task in (
    Task("cola", "CoLA", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=4, text_columns=(3,), label_column=1,
         labels=_BINARY, has_header=False, metrics=("matthews_corr",), tfds_name="glue/cola",
         tfds_text_keys=("sentence",)),
    Task("sst2", "SST-2", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=2, text_columns=(0,), label_column=1,
         labels=_BINARY, tfds_name="glue/sst2", tfds_text_keys=("sentence",)),
    Task("mrpc", "MRPC", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=5, text_columns=(3, 4),
         label_column=0, labels=_BINARY, metrics=("f1", "accuracy"), tfds_name="glue/mrpc",
         tfds_text_keys=("sentence1", "sentence2")),
    Task("stsb", "STS-B", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=10, text_columns=(7, 8),
         label_column=-1, metrics=("pearson", "spearman"), tfds_name="glue/stsb",
         tfds_text_keys=("sentence1", "sentence2")),
    Task("rte", "RTE", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=4, text_columns=(1, 2), label_column=3,
         labels=_ENTAILMENT, tfds_name="glue/rte", tfds_text_keys=("sentence1", "sentence2")),
    Task("wnli", "WNLI", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=4, text_columns=(1, 2),
         label_column=3, labels=_BINARY, tfds_name="glue/wnli", tfds_text_keys=("sentence1", "sentence2")),
    # Not available offline here; real users have them.
    Task("qqp", "QQP", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=6, text_columns=(3, 4), label_column=5,
         labels=_BINARY, metrics=("f1", "accuracy"), tfds_name="glue/qqp", tfds_text_keys=("question1", "question2")),
    Task("mnli", "MNLI", {"train": "train.tsv", "dev_matched": "dev_matched.tsv",
                          "dev_mismatched": "dev_mismatched.tsv"},
         num_columns=0, text_columns=(8, 9), label_column=-1, labels=("entailment", "neutral", "contradiction"),
         tfds_name="glue/mnli", tfds_text_keys=("premise", "hypothesis")),
    Task("qnli", "QNLI", {"train": "train.tsv", "dev": "dev.tsv"}, num_columns=4, text_columns=(1, 2),
         label_column=3, labels=_ENTAILMENT, tfds_name="glue/qnli", tfds_text_keys=("question", "sentence")),
)}

OFFLINE_TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")


def get_task(name: str) -> Task:
  task = TASKS.get(name.lower().replace("-", ""))
  if task is None:
    raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(TASKS)}")
  return task


def dev_splits(task: Task) -> tuple[str, ...]:
  """The labelled evaluation splits (MNLI has two)."""
  return tuple(split for split in task.splits if split != "train")


def split_path(task: Task, split: str, data_dir: PathLike) -> pathlib.Path:
  if split not in task.splits:
    raise ValueError(f"GLUE task {task.name} has no split {split!r}; it has {', '.join(task.splits)}")
  path = pathlib.Path(data_dir) / task.directory / task.splits[split]
  if not path.is_file():
    raise FileNotFoundError(f"GLUE {task.name} {split} file {path} not found (--glue_dir or $HMOE_DATA_DIR/glue)")
  return path


def _parse_label(task: Task, raw: str, where: str) -> int | float:
  raw = raw.strip()
  if task.is_regression:
    try:
      return float(raw)
    except ValueError:
      raise GlueFormatError(f"{where}: score {raw!r} is not a number") from None
  if raw not in task.labels:
    raise GlueFormatError(f"{where}: label {raw!r} is not one of {list(task.labels)}")
  return task.labels.index(raw)


def parse_rows(task: Task, lines: Iterable[str], source: str) -> list[Example]:
  """Examples from the lines of one TSV (header skipped if the task has one); `source` names it in errors."""
  needed = max(max(task.text_columns), task.label_column) + 1
  examples = []
  for number, line in enumerate(lines, start=1):
    if number == 1 and task.has_header:
      continue
    line = line.rstrip("\r\n")
    if not line:
      continue
    fields = line.split("\t")  # GLUE's TSVs are unquoted: a quote character is part of the text.
    where = f"{source} line {number}"
    if (len(fields) != task.num_columns) if task.num_columns else (len(fields) < needed):
      expected = task.num_columns or f"at least {needed}"
      raise GlueFormatError(f"{where}: expected {expected} tab-separated fields, found {len(fields)}")
    texts = [fields[column].strip() for column in task.text_columns]
    examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None,
                            _parse_label(task, fields[task.label_column], where)))
  if not examples:
    raise GlueFormatError(f"{source} holds no examples")
  return examples


def read_split(task: Task, split: str, data_dir: PathLike) -> list[Example]:
  """All examples of one split file (`data_dir` is the folder holding CoLA/, SST-2/, ...)."""
  path = split_path(task, split, data_dir)
  # utf-8-sig: the MRPC files start with a byte-order mark.
  with path.open(encoding="utf-8-sig") as stream:
    return parse_rows(task, stream, str(path))


def _tfds_split_name(task: Task, split: str) -> str:
  return {"dev": "validation", "dev_matched": "validation_matched",
          "dev_mismatched": "validation_mismatched"}.get(split, split)


def examples_from_records(task: Task, records: Iterable[Mapping[str, object]], source: str) -> list[Example]:
  """Examples from tensorflow-datasets GLUE records (dicts of bytes/str texts and an int/float `label`)."""
  text = lambda value: value.decode("utf-8") if isinstance(value, bytes) else str(value)
  examples = []
  for number, record in enumerate(records, start=1):
    missing = [key for key in (*task.tfds_text_keys, "label") if key not in record]
    if missing:
      raise GlueFormatError(f"{source} record {number}: missing {missing}")
    texts = [text(record[key]).strip() for key in task.tfds_text_keys]
    label = record["label"]
    label = float(label) if task.is_regression else int(label)
    if not task.is_regression and not 0 <= label < task.num_outputs:
      raise GlueFormatError(f"{source} record {number}: label {label} outside [0, {task.num_outputs})")
    examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
  return examples


def read_tfds_split(task: Task, split: str, data_dir: PathLike | None = None,
                    tfds_module: object | None = None) -> list[Example]:
  """The split from tensorflow-datasets' GLUE builder (`pip install tensorflow-datasets`; downloads on first use).

  TFDS numbers the classes as the GLUE TSVs do (checked: the same number of classes, and the same names where the
  TSVs use names rather than 0/1).
  """
  if tfds_module is None:
    try:
      import tensorflow_datasets as tfds_module  # Optional dependency.
    except ImportError:
      raise ImportError("the tfds input path needs tensorflow-datasets: pip install tensorflow-datasets") from None
  name = task.tfds_name
  dataset, info = tfds_module.load(name, split=_tfds_split_name(task, split), data_dir=data_dir, with_info=True)
  if not task.is_regression:
    names = tuple(info.features["label"].names)
    if len(names) != task.num_outputs or (task.labels != _BINARY and names != task.labels):
      raise GlueFormatError(f"tfds {name} labels {names} differ from hmoe's {task.labels}")
  return examples_from_records(task, tfds_module.as_numpy(dataset), f"tfds {name} {split}")


def label_array(task: Task, examples: Sequence[Example]) -> np.ndarray:
  return np.asarray([example.label for example in examples], np.float32 if task.is_regression else np.int32)
