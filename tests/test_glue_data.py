"""GLUE inputs and metrics without a model: every task's reader on files written here (the three tasks without offline
data included), malformed rows, the tensorflow-datasets path, encoding, batching, metrics against hand-computed values.
"""

import types

import numpy as np
import pytest

from hmoe.data.tokenizer import train_tokenizer
from hmoe.glue import data as glue_data, metrics, tasks
from hmoe.glue.tasks import Example, GlueFormatError

# One header (None: the task has none) and rows per task, in the official GLUE layouts.
_MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                    "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
_FILES = {
    "cola": (None, ["gj04\t1\t\tThe cat sat.", "gj04\t0\t*\tCat the sat."]),
    "sst2": ("sentence\tlabel", ["a charming journey \t1", "labored gags \t0"]),
    "mrpc": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             ['1\t702876\t702977\tHe said "yes".\tHe agreed.', "0\t1\t2\tA dog.\tA cat."]),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
             ["0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000",
              "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man.\tA flute.\t0.500"]),
    "rte": ("index\tsentence1\tsentence2\tlabel", ["0\tA b.\tC d.\tnot_entailment", "1\tE f.\tG h.\tentailment"]),
    "wnli": ("index\tsentence1\tsentence2\tlabel", ["0\tA b.\tC d.\t1", "1\tE f.\tG h.\t0"]),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", ["0\t1\t2\tWhy?\tHow?\t0", "1\t3\t4\tA?\tA?\t1"]),
    "qnli": ("index\tquestion\tsentence\tlabel", ["0\tWho?\tHim.\tentailment", "1\tWhat?\tNo.\tnot_entailment"]),
}
_EXPECTED = {
    "cola": [Example("The cat sat.", None, 1), Example("Cat the sat.", None, 0)],
    "sst2": [Example("a charming journey", None, 1), Example("labored gags", None, 0)],
    "mrpc": [Example('He said "yes".', "He agreed.", 1), Example("A dog.", "A cat.", 0)],
    "stsb": [Example("A plane.", "An air plane.", 5.0), Example("A man.", "A flute.", 0.5)],
    "rte": [Example("A b.", "C d.", 1), Example("E f.", "G h.", 0)],
    "wnli": [Example("A b.", "C d.", 1), Example("E f.", "G h.", 0)],
    "qqp": [Example("Why?", "How?", 0), Example("A?", "A?", 1)],
    "qnli": [Example("Who?", "Him.", 0), Example("What?", "No.", 1)],
}


def _write(root, task_name, split, header, rows):
  task = tasks.get_task(task_name)
  path = root / task.directory / task.splits[split]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(f"{line}\n" for line in ([header] if header is not None else []) + rows), encoding="utf-8")
  return path


@pytest.mark.parametrize("task_name", sorted(_FILES))
def test_every_task_reads_its_official_layout(tmp_path, task_name):
  header, rows = _FILES[task_name]
  _write(tmp_path, task_name, "dev", header, rows)
  assert tasks.read_split(tasks.get_task(task_name), "dev", tmp_path) == _EXPECTED[task_name]


def test_mnli_reads_train_and_both_dev_files_with_their_column_counts(tmp_path):
  train_header = "\t".join(_MNLI_DEV_HEADER.split("\t")[:11] + ["gold_label"])
  _write(tmp_path, "mnli", "train", train_header, ["0\t1\t2\tfiction\tb1\tb2\tp1\tp2\tA man.\tA person.\tentailment"
                                                   "\tentailment"])
  dev_row = "0\t1\t2\tslate\tb1\tb2\tp1\tp2\tA dog.\tA cat.\tneutral\tcontradiction\tcontradiction\tneutral\t{}"
  for split, gold in (("dev_matched", "contradiction"), ("dev_mismatched", "neutral")):
    _write(tmp_path, "mnli", split, _MNLI_DEV_HEADER, [dev_row.format(gold) + f"\t{gold}"])
  task = tasks.get_task("MNLI")
  assert tasks.dev_splits(task) == ("dev_matched", "dev_mismatched")
  assert tasks.read_split(task, "train", tmp_path) == [Example("A man.", "A person.", 0)]
  assert tasks.read_split(task, "dev_matched", tmp_path) == [Example("A dog.", "A cat.", 2)]
  assert tasks.read_split(task, "dev_mismatched", tmp_path) == [Example("A dog.", "A cat.", 1)]


@pytest.mark.parametrize("task_name, row, message", [
    ("rte", "0\tA b.\tentailment", "line 3: expected 4 tab-separated fields, found 3"),
    ("rte", "0\tA b.\tC d.\tmaybe", "line 3: label 'maybe' is not one of ['entailment', 'not_entailment']"),
    ("stsb", "0\tg\tf\ty\to\ts\ts\tA.\tB.\tfive", "line 3: score 'five' is not a number"),
    ("cola", "gj04\t2\t\tA cat.", "line 2: label '2' is not one of ['0', '1']"),
])
def test_a_malformed_row_names_file_and_line(tmp_path, task_name, row, message):
  header, rows = _FILES[task_name]
  path = _write(tmp_path, task_name, "train", header, [rows[0], row])
  with pytest.raises(GlueFormatError) as error:
    tasks.read_split(tasks.get_task(task_name), "train", tmp_path)
  assert str(path) in str(error.value) and message in str(error.value)


def test_missing_empty_and_unknown_inputs_fail_by_name(tmp_path):
  with pytest.raises(FileNotFoundError, match="RTE"):
    tasks.read_split(tasks.get_task("rte"), "train", tmp_path)
  _write(tmp_path, "rte", "train", _FILES["rte"][0], [])
  with pytest.raises(GlueFormatError, match="holds no examples"):
    tasks.read_split(tasks.get_task("rte"), "train", tmp_path)
  with pytest.raises(ValueError, match="unknown GLUE task 'boolq'"):
    tasks.get_task("boolq")
  with pytest.raises(ValueError, match="no split 'test'"):
    tasks.split_path(tasks.get_task("wnli"), "test", tmp_path)


class _FakeTfds(types.SimpleNamespace):
  """The two calls `read_tfds_split` makes of tensorflow_datasets, over in-memory records."""

  def __init__(self, records, label_names):
    super().__init__(calls=[])
    self.records, self.label_names = records, label_names

  def load(self, name, split, data_dir, with_info):
    self.calls.append((name, split))
    features = {"label": types.SimpleNamespace(names=self.label_names)}
    return self.records, types.SimpleNamespace(features=features)

  def as_numpy(self, dataset):
    return iter(dataset)


def test_tfds_records_become_the_same_examples():
  records = [{"sentence1": b"A b.", "sentence2": b"C d.", "label": 1, "idx": 0},
             {"sentence1": "E f.", "sentence2": "G h.", "label": 0, "idx": 1}]
  fake = _FakeTfds(records, ["entailment", "not_entailment"])
  assert tasks.read_tfds_split(tasks.get_task("rte"), "dev", tfds_module=fake) == _EXPECTED["rte"]
  assert fake.calls == [("glue/rte", "validation")]
  stsb = _FakeTfds([{"sentence1": b"A.", "sentence2": b"B.", "label": np.float32(3.5)}], [])
  assert tasks.read_tfds_split(tasks.get_task("stsb"), "train", tfds_module=stsb) == [Example("A.", "B.", 3.5)]
  with pytest.raises(GlueFormatError, match="labels"):
    tasks.read_tfds_split(tasks.get_task("rte"), "dev", tfds_module=_FakeTfds(records, ["yes", "no"]))
  with pytest.raises(GlueFormatError, match="record 1: missing"):
    tasks.read_tfds_split(tasks.get_task("qnli"), "dev", tfds_module=_FakeTfds(records, ["entailment",
                                                                                           "not_entailment"]))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "train.txt"
  path.write_text(" the cat sat on a mat . a dog ran to the house .\n" * 20)
  return train_tokenizer(path, 300)


def test_encode_joins_pairs_with_eos_and_cuts_the_longer_text_first(tokenizer):
  long_a, short_b = "the cat sat on a mat . " * 10, "a dog"
  ids_a, ids_b = tokenizer.encode(long_a), tokenizer.encode(short_b)
  split = glue_data.encode(tokenizer, [Example(long_a, short_b, 1), Example("a dog", None, 0)][:1],
                           np.asarray([1]), max_len=24)
  eos = tokenizer.eos_id
  row = list(split.tokens[0, :split.lengths[0]])
  assert split.lengths[0] == 24 and split.num_truncated == 1 and split.tokens.shape == (1, 24)
  assert row == ids_a[:24 - 2 - len(ids_b)] + [eos] + ids_b + [eos]  # The short text is kept whole.
  single = glue_data.encode(tokenizer, [Example("a dog", None, 0), Example("the cat sat", None, 1)],
                            np.asarray([0, 1]), max_len=64)
  assert single.tokens.shape == (2, 8)  # Padded to a multiple of 8, not to max_len.
  assert list(single.tokens[0, :single.lengths[0]]) == tokenizer.encode("a dog") + [eos]
  assert np.all(single.tokens[0, single.lengths[0]:] == tokenizer.pad_id)
  with pytest.raises(ValueError, match="no room"):
    glue_data.encode(tokenizer, [Example("a", "b", 0)], np.asarray([0]), max_len=2)


def test_batches_are_per_epoch_permutations_and_eval_batches_cover_every_row_once(tokenizer):
  examples = [Example(f"the cat {i}", None, i % 2) for i in range(10)]
  split = glue_data.encode(tokenizer, examples, np.arange(10) % 2, max_len=16)
  per_epoch = glue_data.steps_per_epoch(10, 3)
  assert per_epoch == 3
  epoch = [glue_data.train_batch(split, step, 3, seed=0) for step in range(per_epoch)]
  rows = np.concatenate([np.where((split.tokens[None] == b["tokens"][:, None]).all(-1))[1] for b in epoch])
  assert len(set(rows.tolist())) == 9  # Nine distinct examples in epoch 0; one is left for that epoch.
  np.testing.assert_array_equal(glue_data.train_batch(split, 4, 3, seed=0)["tokens"],
                                glue_data.train_batch(split, 4, 3, seed=0)["tokens"])
  assert not np.array_equal(glue_data.train_batch(split, 0, 3, seed=0)["tokens"],
                            glue_data.train_batch(split, 3, 3, seed=0)["tokens"])  # Epoch 1 is reshuffled.
  batches = list(glue_data.eval_batches(split, 4))
  assert [b["weights"].sum() for b in batches] == [4, 4, 2] and all(b["tokens"].shape == (4, 8) for b in batches)
  np.testing.assert_array_equal(np.concatenate([b["labels"][b["weights"] > 0] for b in batches]), split.labels)
  with pytest.raises(ValueError, match="exceeds the 10 training examples"):
    glue_data.steps_per_epoch(10, 11)


def test_metrics_against_hand_computed_values():
  labels = np.asarray([1, 1, 1, 0, 0, 0, 1, 0])
  preds = np.asarray([1, 1, 0, 0, 0, 1, 1, 0])  # TP 3, FN 1, TN 3, FP 1.
  cola, mrpc = tasks.get_task("cola"), tasks.get_task("mrpc")
  np.testing.assert_allclose(metrics.compute(cola, preds, labels)["matthews_corr"], (9 - 1) / 16, atol=1e-12)
  scores = metrics.compute(mrpc, preds, labels)
  np.testing.assert_allclose([scores["f1"], scores["accuracy"]], [0.75, 0.75], atol=1e-12)
  stsb = metrics.compute(tasks.get_task("stsb"), np.asarray([1.0, 2.0, 3.0, 4.0]), np.asarray([1.0, 4.0, 9.0, 16.0]))
  np.testing.assert_allclose(stsb["pearson"], 25 / np.sqrt(5 * 129), atol=1e-12)
  np.testing.assert_allclose(stsb["spearman"], 1.0, atol=1e-12)  # Monotone: the ranks agree exactly.
  ranks = metrics.compute(tasks.get_task("stsb"), np.asarray([1.0, 2.0, 3.0]), np.asarray([1.0, 3.0, 2.0]))
  np.testing.assert_allclose([ranks["pearson"], ranks["spearman"]], [0.5, 0.5], atol=1e-12)
  # Degenerate predictions: one class everywhere has Matthews 0, F1 0 when it is the negative class.
  assert metrics.compute(cola, np.zeros(8, int), labels)["matthews_corr"] == 0.0
  assert metrics.compute(mrpc, np.zeros(8, int), labels)["f1"] == 0.0
  assert metrics.compute(tasks.get_task("stsb"), np.full(4, 2.0), np.arange(4.0))["pearson"] == 0.0
  with pytest.raises(ValueError, match="equal-length"):
    metrics.compute(cola, preds[:3], labels)


def test_majority_baseline():
  rte, stsb = tasks.get_task("rte"), tasks.get_task("stsb")
  np.testing.assert_array_equal(metrics.majority_predictions(rte, np.asarray([0, 1, 1]), 3), [1, 1, 1])
  np.testing.assert_array_equal(metrics.majority_predictions(rte, np.asarray([0, 1]), 2), [0, 0])  # Tie: lower.
  np.testing.assert_allclose(metrics.majority_predictions(stsb, np.asarray([1.0, 2.0, 6.0]), 2), [3.0, 3.0])
