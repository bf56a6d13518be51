"""launch/colab_tpu_demo.ipynb executed end to end on CPU, in its tiny setting (VLCAL_NOTEBOOK_TINY=1).

The kernel is this interpreter's ipykernel, started from the repository root (so the
notebook finds vlcal_jax importable and skips its install step) with the workdir in tmp_path.
It must fall back to CPU with its message, display the reliability diagrams (image/png
outputs) and the before/after table read from the run's summary.json, and answer a question.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import sys

import ipykernel  # noqa: F401  (the kernel the notebook runs in; setup.py's test extra)
import nbclient
import nbformat
import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu_demo.ipynb")
TIMEOUT = 600


def outputs(cell) -> list[dict]:
    return cell.get("outputs", [])


def text_of(cells) -> str:
    """Everything the cells printed or displayed as text (stdout, stderr, text/plain, text/markdown)."""
    parts = []
    for cell in cells:
        for out in outputs(cell):
            if out["output_type"] == "stream":
                parts.append(out["text"])
            for mime in ("text/plain", "text/markdown"):
                if mime in out.get("data", {}):
                    parts.append(out["data"][mime])
    return "\n".join(parts)


def test_notebook_is_stored_clean_and_valid():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store the notebook without outputs"
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell holds the parameters"


def test_tiny_setting_is_the_readme_tests_short_demo():
    """VLCAL_NOTEBOOK_TINY applies test_readme_commands.SHORT, the override set the suite already
    compiles the demo with, as a dict."""
    import test_readme_commands

    nb = nbformat.read(NOTEBOOK, as_version=4)
    calls = [node for cell in nb.cells if cell.cell_type == "code" for node in ast.walk(ast.parse(cell.source))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "update_from_flattened_dict"]
    assert len(calls) == 1, "the notebook sets the tiny overrides in one update_from_flattened_dict call"
    tiny = ast.literal_eval(calls[0].args[0])
    short = dict(flag[len("--config."):].split("=") for flag in test_readme_commands.SHORT.split())
    assert {k: str(v) for k, v in tiny.items()} == short


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A `python3` kernelspec that runs this interpreter (not whatever python3 a user's jupyter
    directory names), the package importable from the repository, the tiny demo in tmp_path."""
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for key, value in conftest.subprocess_cache_env().items():  # the README demo compiles the same programs
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("VLCAL_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("VLCAL_NOTEBOOK_WORKDIR", str(tmp_path / "demo"))
    monkeypatch.setenv("VLCAL_REPO_URL", "")  # importable already: nothing may be cloned or installed
    return tmp_path / "demo"


def test_notebook_runs_end_to_end_on_cpu(kernel_env):
    workdir = kernel_env
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=TIMEOUT,
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [out for c in code for out in outputs(c) if out["output_type"] == "error"]
    assert not errors, errors
    text = text_of(code)
    assert "No TPU found: running on CPU" in text
    assert "INFO:vlcal_jax" not in text, "each log line once, in logs.setup_logging's format"
    assert f"vlcal_jax from {os.path.join(ROOT, 'vlcal_jax')}" in text  # the checkout, not a fresh install

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["before_rl"] and summary["after_rl"]
    # the table shows summary.json's numbers
    assert "| metric | before RL | after RL |" in text
    for key in ("accuracy", "ece"):
        assert f"| {key} | {summary['before_rl'][key]:.3f} | {summary['after_rl'][key]:.3f} |" in text

    pngs = [out for c in code for out in outputs(c) if "image/png" in out.get("data", {})]
    diagrams = [workdir / "eval" / tag / "reliability_confidence.png" for tag in ("before_rl", "after_rl")]
    assert all(p.is_file() for p in diagrams)
    # the displayed images are the run's reliability diagrams (and curves, and the scene asked about)
    shown = {base64.b64decode(out["data"]["image/png"]) for out in pngs}
    assert {p.read_bytes() for p in diagrams} <= shown
    assert "before_rl: confidence" in text and "after_rl: confidence" in text
    assert "vision confidence:" in text and "answer:" in text
