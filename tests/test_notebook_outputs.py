"""The notebooks of nbs/ are committed executed (`make docs-refresh`), so a reader sees their tables, plots
and examples; their outputs hold no error, no path of the machine that wrote them, no progress-bar debris,
and small images. The tidying `tools/execute_notebooks.py` applies is checked on a synthetic notebook."""
import base64
import importlib.util
import io

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from movierec.core import PROJECT_ROOT

_spec = importlib.util.spec_from_file_location("execute_notebooks", PROJECT_ROOT / "tools" / "execute_notebooks.py")
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)

NOTEBOOKS = sorted((PROJECT_ROOT / "nbs").glob("*.ipynb"))
NO_OUTPUT_OK: dict[str, str] = {}  # notebook name -> why it has nothing to show (none so far)
FORBIDDEN = ["/tmp/", "/root/", "/work/", "it/s]", "TqdmWarning"]


def _text(value) -> str: return value if isinstance(value, str) else "".join(value)


def _texts(out) -> list[str]:
    "Every piece of text an output shows (streams, text/* data, tracebacks)."
    if out.output_type == "stream": return [_text(out.text)]
    if out.output_type == "error": return [out.ename, out.evalue, *out.traceback]
    return [_text(v) for k, v in out.get("data", {}).items() if k.startswith("text/") or k == "application/json" and isinstance(v, str)]


def _pngs(nb) -> list[bytes]:
    return [base64.b64decode(_text(o.data["image/png"])) for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_clean_outputs(path):
    nb = nbformat.read(path, as_version=4)
    outputs = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs]
    if path.name not in NO_OUTPUT_OK:
        assert outputs, f"{path.name} has no outputs: run `make docs-refresh` (or `python tools/execute_notebooks.py nbs/{path.name}`)"
    for i, out in outputs:
        where = f"{path.name}, cell {i}"
        assert out.output_type != "error", f"{where}: an error output ({out.ename}: {out.evalue})"
        assert not (out.output_type == "stream" and out.name == "stderr"), f"{where}: a stderr stream"
        assert execute_notebooks.WIDGET_MIME not in out.get("data", {}), f"{where}: a widget view (no state to render it)"
        for text in _texts(out):
            found = [s for s in FORBIDDEN if s in text]
            assert not found, f"{where}: output holds {found}: {text[:200]!r}"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the notebook's metadata"
    from PIL import Image  # pillow comes with matplotlib
    for png in _pngs(nb):
        img = Image.open(io.BytesIO(png)); img.load()  # decodes, or raises
        assert img.format == "PNG" and len(png) <= execute_notebooks.MAX_PNG_BYTES and img.width <= execute_notebooks.MAX_PNG_WIDTH, \
            f"{path.name}: a {img.width}x{img.height} PNG of {len(png):,} bytes"


def _noise_png(width: int, height: int) -> str:
    "A PNG that compresses badly (random pixels), base64 as in a notebook."
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tidy_outputs_drops_noise_redacts_paths_and_shrinks_images():
    from PIL import Image
    root, big, small = str(PROJECT_ROOT), _noise_png(1200, 900), _noise_png(40, 30)
    assert len(base64.b64decode(big)) > execute_notebooks.MAX_PNG_BYTES
    nb = new_notebook(metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}}, cells=[
        new_code_cell("run()", outputs=[
            new_output("stream", name="stderr", text="FutureWarning: something is deprecated\n"),
            new_output("stream", name="stdout", text=f"wrote {root}/runs/x/metrics.json\n"),
            new_output("stream", name="stdout", text="loss 0.5\rloss 0.4\rloss 0.3\nsaved /tmp/tmpk2j4x_ab/eval/plots/a.png\n"),
            new_output("display_data", data={execute_notebooks.WIDGET_MIME: {"model_id": "abc"},
                                             "text/plain": "HBox(children=(FloatProgress(value=0.0),))"}),
            new_output("execute_result", data={"text/plain": "PosixPath('/root/.cache/movierec/ollama')",
                                               "text/html": "<td>/tmp/tmp_x1/data</td><td>runs/tmp/y</td>"}, execution_count=3),
        ]),
        new_code_cell("fig", outputs=[new_output("display_data", data={"image/png": big, "text/plain": "<Figure>"},
                                                 metadata={"image/png": {"width": 1200, "height": 900}}),
                                      new_output("display_data", data={"image/png": small, "text/plain": "<Figure>"})]),
    ])
    nb = execute_notebooks.tidy_outputs(nbformat.from_dict(nb))
    first, second = nb.cells[0].outputs, nb.cells[1].outputs
    stdout, result = first[0], first[1]
    assert len(first) == 2 and stdout.name == "stdout"   # stderr and the widget view dropped, stdout merged
    assert stdout.text == "wrote <project>/runs/x/metrics.json\nloss 0.3\nsaved <tmp>/eval/plots/a.png\n"
    assert result.data["text/plain"] == "PosixPath('~/.cache/movierec/ollama')"
    assert result.data["text/html"] == "<td>&lt;tmp&gt;/data</td><td>runs/tmp/y</td>"  # relative paths stay
    assert "widgets" not in nb.metadata
    shrunk = base64.b64decode(second[0].data["image/png"])
    img = Image.open(io.BytesIO(shrunk)); img.load()
    assert len(shrunk) <= execute_notebooks.MAX_PNG_BYTES and img.width <= execute_notebooks.MAX_PNG_WIDTH
    assert abs(img.width / img.height - 1200 / 900) < 0.02 and "image/png" not in second[0].metadata  # same shape, no stale size hint
    assert second[1].data["image/png"] == small   # a small image is left as it was
    assert execute_notebooks.tidy_outputs(nbformat.from_dict(nb)) == nb  # tidying twice changes nothing


def test_skips_the_cells_nbdev_test_skips():
    flags = {"notest", "slow"}
    skipped = [execute_notebooks._skipped(new_code_cell(src), flags) for src in
               ["#| eval: false\nrun()", "#| slow\nrun()", "#| export\ndef f(): pass", "x = 1", "nbdev_export()"]]
    assert skipped == [True, True, False, False, True]
