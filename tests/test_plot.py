"""experiments/plot.py on synthetic run directories: the series it reads, regroup events, the front, the PNGs."""

import json

import pytest

from experiments import plot


def _write_run(root, name, params_total, valid_ppl, regroups=(), routed=True, finished=True):
  workdir = root / name
  workdir.mkdir()
  rows = [{"step": 0, "model/params_total": params_total}]
  for step in (10, 20, 30):
    row = {"step": step, "train/ce_loss": 6.0 - step / 10}
    if routed:
      row["train/load_cv"] = 1.0 / step
    rows.append(row)
  rows += [{"step": step, "regroup/adopted": adopted, "regroup/loss_before": 4.0} for step, adopted in regroups]
  rows += [{"step": 20, "valid/word_perplexity": valid_ppl + 50}, {"step": 30, "valid/word_perplexity": valid_ppl},
           {"step": 30, "test/word_perplexity": valid_ppl - 10}]
  if not finished:
    rows = [row for row in rows if "test/word_perplexity" not in row]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def runs_root(tmp_path):
  _write_run(tmp_path, "dense", 1_000_000, 310.0, routed=False)
  _write_run(tmp_path, "moe_s0", 3_000_000, 280.0)
  _write_run(tmp_path, "moe_s1", 3_000_000, 290.0)
  _write_run(tmp_path, "hmoe", 1_500_000, 300.0, regroups=[(15, [True, False]), (25, [False, False])])
  _write_run(tmp_path, "big_bad", 4_000_000, 400.0)
  _write_run(tmp_path, "unfinished", 500_000, 200.0, finished=False)  # Would lead the front if it counted.
  (tmp_path / "empty").mkdir()
  return tmp_path


def test_readers_pool_seeds_and_find_the_front(runs_root, capsys):
  runs = plot.load_runs([str(runs_root / "*")])
  assert sorted(runs) == ["big_bad", "dense", "hmoe", "moe_s0", "moe_s1", "unfinished"]
  assert "skipping" in capsys.readouterr().out  # The directory without metrics is named, not silently dropped.
  assert plot.series(runs["dense"], "valid/word_perplexity") == ([20, 30], [360.0, 310.0])
  assert plot.regroup_events(runs["hmoe"]) == [(15, True), (25, False)]
  points = {point["name"]: point for point in plot.front_points(runs)}
  assert "unfinished" not in points
  assert points["moe"] == {"name": "moe", "params_total": 3_000_000, "valid": 285.0, "low": 280.0, "high": 290.0,
                           "seeds": 2}
  assert [point["name"] for point in plot.pareto(list(points.values()))] == ["dense", "hmoe", "moe"]


def test_plot_all_writes_the_three_figures(runs_root, tmp_path):
  written = plot.plot_all(plot.load_runs([str(runs_root / "*")]), tmp_path / "figures", prefix="t_")
  assert [path.name for path in written] == ["t_curves.png", "t_load.png", "t_front.png"]
  for path in written:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
  # A dense-only set has no load figure.
  dense_only = plot.plot_all({"dense": plot.load_runs([str(runs_root / "dense")])["dense"]}, tmp_path / "d")
  assert [path.name for path in dense_only] == ["curves.png", "front.png"]
