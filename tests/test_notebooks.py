"""The example notebooks: committed without outputs, on the public API only, and executed top to bottom.

Execution uses a fresh kernel running this interpreter (a kernel spec written into a temporary
JUPYTER_PATH, so it works from a clean clone where no kernel was ever installed), injects a
parameter cell after the notebook's "parameters" cell the way papermill does (tiny budgets,
artefacts in a temporary folder), and checks what the notebooks produced.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL = "clipforge-tests"
CELL_TIMEOUT_S = 300
TINY = {"N_TRAIN": 200, "N_VAL": 50, "BATCH_SIZE": 32, "MAX_STEPS": 3, "THREADS": 1, "NUM_WORKERS": 0,
        "CSV_MAX_SAMPLES": 48, "CSV_MAX_STEPS": 2}


def _read(path: Path) -> Any:
    return nbformat.read(path, as_version=4)


def _code(nb: Any) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_the_examples_are_train_and_predict() -> None:
    assert [p.name for p in NOTEBOOKS] == ["predict.ipynb", "train.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path: Path) -> None:
    nb = _read(path)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a code cell has outputs; strip them before committing"
            assert cell.execution_count is None, f"{path.name}: a code cell has an execution count"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the metadata"
    assert nb.metadata.kernelspec.name == "python3"  # the kernel any Jupyter offers, not one named on this machine


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_public_api_only(path: Path) -> None:
    """No private module, name or attribute of ours (a leading underscore) in any code cell."""
    ours = ("model", "training", "index", "app", "interop")
    for source in _code(_read(path)):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                assert not any(part.startswith("_") for part in node.module.split(".")), ast.unparse(node)
                assert not any(alias.name.startswith("_") for alias in node.names), ast.unparse(node)
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ours and "._" in a.name for a in node.names), ast.unparse(node)
            if isinstance(node, ast.Attribute):
                assert not node.attr.startswith("_"), f"{path.name}: private attribute in {ast.unparse(node)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_one_parameters_cell(path: Path) -> None:
    tagged = [c for c in _read(path).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assigned = {t.id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign)
                for t in ast.walk(node.targets[0]) if isinstance(t, ast.Name)}
    assert "OUT_DIR" in assigned


# ---------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A kernel spec for this interpreter in a temporary JUPYTER_PATH (searched before user and system specs)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "clipforge tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        mp.delenv("MPLBACKEND", raising=False)  # the kernel picks its inline backend itself
        mp.setenv("TQDM_MININTERVAL", "5")
        yield KERNEL


def execute(name: str, kernel: str, params: dict[str, Any]) -> Any:
    """Run examples/<name> in a fresh kernel, started in examples/ as Jupyter does, with params injected."""
    nb = _read(EXAMPLES / name)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    return nb


def outputs(nb: Any) -> tuple[str, int]:
    """All text the notebook printed or returned, and how many PNG images it displayed."""
    text, pngs = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                pngs += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
            elif out.output_type == "error":
                text.append(f"{out.ename}: {out.evalue}")
    return "\n".join(text), pngs


@pytest.fixture(scope="module")
def trained(kernel_name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("notebooks")
    flickr = SHARED_DATA / "flickr8k-1k" if (SHARED_DATA / "flickr8k-1k").is_dir() else out / "no-flickr8k"
    nb = execute("train.ipynb", kernel_name, {"OUT_DIR": str(out), **TINY, "FLICKR8K_DIR": str(flickr)})
    return out, nb


@pytest.mark.slow
def test_train_notebook_saves_a_checkpoint_and_shows_curves(trained: tuple[Path, Any]) -> None:
    out, nb = trained
    best = out / "shapes-run" / "best"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "meta.json"):
        assert (best / name).is_file(), name
    meta = json.loads((best / "meta.json").read_text(encoding="utf-8"))
    assert meta["step"] == TINY["MAX_STEPS"]
    assert (out / "shapes-run" / "plots" / "loss.png").is_file()
    text, pngs = outputs(nb)
    assert "zeroshot_top1" in text and meta["content_hash"][:16] in text
    assert pngs >= 3  # the data samples, then the loss and results plots
    if (SHARED_DATA / "flickr8k-1k").is_dir():
        assert (out / "flickr8k-run" / "best" / "model.safetensors").is_file()
        assert "recall@5 image->text" in text and pngs >= 5
    else:
        assert "skipping the CSV example" in text


@pytest.mark.slow
def test_train_notebook_skips_the_csv_example_without_its_data(
    kernel_name: str, tmp_path: Path, shared_data: Path
) -> None:
    """The skip is checked here when the data is present (without it the run above takes this path)."""
    nb = execute("train.ipynb", kernel_name, {"OUT_DIR": str(tmp_path), **TINY, "MAX_STEPS": 1,
                                              "FLICKR8K_DIR": str(tmp_path / "absent")})
    text, _ = outputs(nb)
    assert f"skipping the CSV example: {tmp_path / 'absent' / 'captions.txt'} does not exist" in text
    assert "skipped: no CSV data" in text
    assert not (tmp_path / "flickr8k-run").exists()
    assert (tmp_path / "shapes-run" / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_predict_notebook_classifies_ranks_and_searches(kernel_name: str, trained: tuple[Path, Any]) -> None:
    from index import ImageIndex
    from model import CLIPInference, read_meta
    from training.data import shapes_eval_set

    out, _ = trained
    nb = execute("predict.ipynb", kernel_name, {"OUT_DIR": str(out), "N_IMAGES": 3, "QUERY": "a red square", "K": 4})
    text, pngs = outputs(nb)
    model_id = read_meta(out / "shapes-run" / "best")["content_hash"]
    assert f"model {model_id[:16]}" in text
    lines = [line for line in text.splitlines() if "top 3:" in line]
    assert len(lines) == 3 and all(line.count("%") == 3 for line in lines)
    assert "'a red square' against 36 images; best 4:" in text  # two images of each of the 18 combinations
    assert "search 'a red square': 4 results" in text
    assert pngs == 3  # probabilities, ranking, search results
    with ImageIndex.open(out / "indexes" / model_id[:16], model_id=model_id) as idx:
        heldout, _ = shapes_eval_set(out / "shapes-data", "heldout")
        assert len(idx) == TINY["N_VAL"] + len(heldout)  # the val split and the held-out combinations
        clip = CLIPInference.load(out / "shapes-run" / "best")
        assert len(idx.search_text(clip, "a red circle", k=3)) == 3
