"""The demo notebook runs top to bottom (so it cannot rot) and is stored without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "demo.ipynb"


def test_notebook_is_stored_without_outputs() -> None:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, "the notebook has no code"
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # run a copy from a scratch folder: the notebook's ../data and ../outputs land in tmp_path
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    monkeypatch.setenv("CAPTIONER_NOTEBOOK_EPOCHS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "bleu4" in text and "best val_bleu4" in text
    # the gradient-flow section: one line per cell (LSTM, GRU, RNN)
    assert sum(f"{cell:<4}: at k=" in text for cell in ("LSTM", "GRU", "RNN")) == 3
    # the truncated-BPTT section: a chunk as long as the captions is full BPTT exactly, and
    # what a step holds for backward stops growing with the caption's length once truncated
    assert "TBPTT K=31: largest gradient difference from full BPTT 0.0e+00" in text
    held = text.split("MB held, full / K=8 / K=4: ", 1)[1].splitlines()[0]
    assert held.count("tokens") == 4
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # captions, training curves, gradient flow, memory held vs length
    assert (tmp_path / "outputs" / "notebook" / "evaluate" / "metrics.json").is_file()
