"""The Colab notebook is a test: CI executes colab/hmoe_tour.ipynb top to bottom (nbclient) with small settings on
the synthetic WikiText corpus, and checks what its cells print."""

import pathlib

import nbclient
import nbformat

_NOTEBOOK = pathlib.Path(__file__).parents[1] / "colab" / "hmoe_tour.ipynb"


def test_the_notebook_runs_top_to_bottom(wikitext_dir, tmp_path):
  notebook = nbformat.read(_NOTEBOOK, as_version=4)
  (settings,) = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.startswith("STEPS =")]
  settings.source = (f"STEPS = 12\nDATA_DIR = {str(wikitext_dir)!r}\nWORKROOT = {str(tmp_path / 'runs')!r}\n"
                     "REPO_URL = ''")
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(_NOTEBOOK.parents[1])}})
  client.execute()  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for output in cell.get("outputs", []) if output.get("output_type") == "stream")
  for expected in ("dense  params", "moe    params", "hmoe   params", "stored bytes: float32",
                   "same tokens as resident: True", "hit rate"):
    assert expected in printed, (expected, printed[-2000:])
  images = sum(output.get("output_type") == "display_data" and "image/png" in output.get("data", {})
               for cell in notebook.cells for output in cell.get("outputs", []))
  assert images == 4  # Loss curves, expert load, cluster map, similarity matrix.
  for kind in ("dense", "moe", "hmoe"):
    assert (tmp_path / "runs" / kind / "metrics.jsonl").exists()
