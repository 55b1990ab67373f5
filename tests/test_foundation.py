"""The foundation is real: notebooks and library in sync, tags survive nbdev_clean, papermill
injects parameters, the base model generates text, Ollama serves it with logprobs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from movierec.core import PROJECT_ROOT

BIN = Path(sys.executable).parent


def _copy_project(dst: Path) -> Path:
    for name in ("nbs", "movierec"):
        shutil.copytree(PROJECT_ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for name in ("settings.ini", "setup.py", "README.md"):
        shutil.copy(PROJECT_ROOT / name, dst / name)
    return dst


def _tree(root: Path, pattern: str) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern)) if "__pycache__" not in p.parts}


def test_library_in_sync_with_notebooks(tmp_path):
    proj = _copy_project(tmp_path)
    before = _tree(proj / "movierec", "*.py")
    subprocess.run([str(BIN / "nbdev_export")], cwd=proj, check=True, capture_output=True)
    after = _tree(proj / "movierec", "*.py")
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"nbdev_export changed {changed}: run nbdev_export and commit"


def test_notebooks_are_clean(tmp_path):
    proj = _copy_project(tmp_path)
    before = _tree(proj / "nbs", "*.ipynb")
    subprocess.run([str(BIN / "nbdev_clean")], cwd=proj, check=True, capture_output=True)
    after = _tree(proj / "nbs", "*.ipynb")
    changed = sorted(k for k in before if before[k] != after[k])
    assert not changed, f"nbdev_clean changed {changed}: run nbdev_clean and commit"


def _nb_with_parameters(path: Path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("greeting = 'default'", metadata={"tags": ["parameters"]})
    nb.cells = [params, nbformat.v4.new_code_cell("from pathlib import Path\nPath('out.txt').write_text(greeting)")]
    nb.metadata["kernelspec"] = {"name": "movierec", "display_name": "Python (movierec)", "language": "python"}
    nbformat.write(nb, path)


def test_parameters_tag_survives_nbdev_clean_and_papermill_injects(tmp_path):
    import nbformat, papermill
    proj = _copy_project(tmp_path)
    nb_path = proj / "nbs" / "zz_params.ipynb"
    _nb_with_parameters(nb_path)
    subprocess.run([str(BIN / "nbdev_clean"), "--fname", str(nb_path)], cwd=proj, check=True, capture_output=True)
    assert nbformat.read(nb_path, 4).cells[0].metadata.get("tags") == ["parameters"]
    papermill.execute_notebook(str(nb_path), str(tmp_path / "out.ipynb"), parameters={"greeting": "injected"},
                               kernel_name="movierec", cwd=str(tmp_path), progress_bar=False)
    assert (tmp_path / "out.txt").read_text() == "injected"


def test_movielens_100k_is_present(ml100k_dir):
    from movierec.data import load_movielens
    ml = load_movielens(ml100k_dir)
    assert len(ml.ratings) == 100_000
    assert ml.ratings.user_id.nunique() == 943
    assert ml.ratings.movie_id.nunique() == 1682 and len(ml.movies) == 1682


@pytest.mark.slow
def test_base_gguf_generates_text(base_gguf):
    import torch

    from movierec.model import load_base
    model, tok = load_base(base_gguf, device="cpu")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_gguf_weights_load_from_their_float_cache(base_gguf, tmp_path, monkeypatch):
    "The first load of a small GGUF keeps its float32 weights; later loads read them, not the file, and get the same numbers."
    import os

    import torch

    from movierec.model import gguf_float_cache, load_base
    monkeypatch.setenv("MOVIEREC_DATA", str(tmp_path / "data"))
    gguf = tmp_path / base_gguf.name
    shutil.copy(base_gguf, gguf)
    first, _ = load_base(gguf, device="cpu")
    assert (gguf_float_cache(gguf) / "config.json").is_file()
    st = gguf.stat()
    gguf.write_bytes(b"\0" * st.st_size)                     # same name, size and time: only the cache can answer now
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    again, _ = load_base(gguf, device="cpu")
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config.tie_word_embeddings and again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    half, _ = load_base(gguf, device="cpu", dtype="bfloat16")
    assert torch.equal(half.model.layers[3].mlp.down_proj.weight, a["model.layers.3.mlp.down_proj.weight"].to(torch.bfloat16))
    ids = torch.tensor([[1, 504, 3458, 282, 4649]])
    with torch.no_grad(): torch.testing.assert_close(first(ids).logits, again(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_ollama_serves_base_gguf_with_logprobs(ollama_server, base_gguf):
    client = ollama_server.client()
    digest = client.create_blob(base_gguf)
    client.create(model="smoke-smollm2", files={base_gguf.name: digest}, stream=False)
    try:
        assert "smoke-smollm2:latest" in [m.model for m in client.list().models]
        r = client.generate(model="smoke-smollm2", prompt="The capital of France is", raw=True,
                            options={"temperature": 0, "num_predict": 3, "seed": 0},
                            logprobs=True, top_logprobs=5)
        assert r.response.strip(), r
        assert r.logprobs and len(r.logprobs[0].top_logprobs) == 5
        assert all(t.logprob <= 0 for t in r.logprobs[0].top_logprobs)
    finally:
        client.delete("smoke-smollm2")
    assert "smoke-smollm2:latest" not in [m.model for m in client.list().models]


def test_library_never_switches_the_matplotlib_backend(tmp_path):
    "Plots must keep showing in a live JupyterLab kernel: no matplotlib.use()/pyplot state in library calls."
    import re
    import matplotlib
    import numpy as np
    import pandas as pd
    offenders = [f"{p.name}:{i + 1}" for p in sorted((PROJECT_ROOT / "movierec").glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines())
                 if re.search(r"matplotlib\.use\(", line)]
    assert not offenders, f"backend switching in the library: {offenders}"
    before = matplotlib.get_backend()
    from movierec.train import write_loss_log
    df, fig = write_loss_log([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}], tmp_path)
    assert matplotlib.get_backend() == before and type(fig).__name__ == "Figure" and (tmp_path / "loss.png").stat().st_size > 1000


def test_every_notebook_opens_on_the_movierec_kernel_with_widgets():
    "JupyterLab asked which kernel to use (no kernelspec), and tqdm's bars fell back to text without ipywidgets."
    import importlib
    nbs = sorted((PROJECT_ROOT / "nbs").glob("**/*.ipynb"))
    assert nbs
    wrong = [p.name for p in nbs if json.loads(p.read_text())["metadata"].get("kernelspec", {}).get("name") != "movierec"]
    assert not wrong, f"notebooks without the movierec kernelspec: {wrong}"
    assert importlib.import_module("ipywidgets").__version__.startswith("8.")
