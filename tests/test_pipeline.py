"""The product as users meet it: the pipeline notebooks under papermill, `movierec run` end to end
on tiny sizes with the real SmolLM2 and the real Ollama, failures, --resume and compare."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest
import yaml

from movierec.core import PROJECT_ROOT
from movierec.params import STAGES
from movierec.pipeline import PIPELINE_DIR, read_stages

MOVIEREC = str(Path(sys.executable).parent / "movierec")
TINY = PROJECT_ROOT / "params" / "tiny.yaml"


@pytest.mark.parametrize("stage", list(STAGES))
def test_parameters_cell_declares_only_what_papermill_injects(stage):
    "The knobs live in the run's params.yaml (one config tree); a stage notebook is handed only its run folder."
    declared = pm.inspect_notebook(str(PIPELINE_DIR / f"{stage}.ipynb"))
    assert set(declared) == {"run_dir"}, "the notebook declares knobs of its own"
    assert declared["run_dir"]["help"], f"{stage}: document run_dir with a comment"


def run_cli(*args, check=True):
    r = subprocess.run([MOVIEREC, *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"movierec {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ollama_server):
    "One whole run on tiny sizes, against the session's real Ollama server."
    run = tmp_path_factory.mktemp("runs") / "tiny"
    r = run_cli("run", "--params", TINY, "--out", run, "--ollama-host", ollama_server.host, "--model-name", "movierec-tiny")
    return run, r


@pytest.mark.slow
def test_run_leaves_a_complete_run_folder(tiny_run):
    run, r = tiny_run
    for f in ("params.yaml", "environment.json", "stages.json", "metrics.json", "predictions.parquet", "report.md",
              "data/data.json", "adapter/adapter_model.safetensors", "adapter/train.json", "gguf/Modelfile",
              "gguf/deploy.json", "gguf/adapter.gguf"):
        assert (run / f).exists(), f
    for stage in STAGES:
        nb = json.loads((run / f"{stage}.ipynb").read_text())
        assert "exception" not in json.dumps(nb["metadata"].get("papermill", {})) or not nb["metadata"]["papermill"]["exception"]
    used = yaml.safe_load((run / "params.yaml").read_text())
    assert used["train_examples"] == 48 and used["eval_sample"] == 24, "sizes as used, resolved"
    metrics = json.loads((run / "metrics.json").read_text())
    models = {m["model"]: m for m in metrics["models"]}
    assert {"global_mean", "user_mean", "movie_mean", "bias", "svd", "zero_shot", "lora", "lora_ollama"} <= set(models)
    assert {m["n"] for m in models.values()} == {24}, "every model scored on the same ratings"
    assert sorted(p.name for p in (run / "plots").glob("*.png")), "plots written"
    assert "lora_ollama" in r.stdout and "report.md" in r.stdout
    env = json.loads((run / "environment.json").read_text())
    assert env["device"] == "cpu" and env["packages"]["torch"]
    assert all(s["status"] == "complete" for s in read_stages(run).values())
    assert "| 02_train | complete |" in (run / "report.md").read_text()


@pytest.mark.slow
def test_resume_skips_completed_stages_and_reruns_changed_ones(tiny_run, ollama_server):
    run, _ = tiny_run
    before = read_stages(run)
    run_cli("run", "--params", TINY, "--out", run, "--ollama-host", ollama_server.host, "--model-name", "movierec-tiny", "--resume")
    assert read_stages(run) == before, "nothing changed, nothing reran"
    run_cli("run", "--params", TINY, "--out", run, "--ollama-host", ollama_server.host, "--model-name", "movierec-tiny",
            "--resume", "--eval-sample", "16", "--no-zero-shot", "--ranking-users", "0")
    after = read_stages(run)
    assert [s for s in STAGES if after[s]["started"] != before[s]["started"]] == ["04_evaluate", "05_report"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {m["n"] for m in metrics["models"]} == {16} and "ranking" not in metrics
    assert not (run / "ranking_users.parquet").exists(), "the first evaluation's ranking is not left behind"


@pytest.mark.slow
def test_compare_two_runs(tiny_run, tmp_path):
    run, _ = tiny_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    p = yaml.safe_load((other / "params.yaml").read_text()); p["lora_rank"] = 4
    (other / "params.yaml").write_text(yaml.safe_dump(p))
    r = run_cli("compare", run, other, "--plot", tmp_path / "cmp.png")
    assert "lora_rank" in r.stdout and "rmse" in r.stdout and (tmp_path / "cmp.png").stat().st_size > 1000


def test_failing_stage_exits_nonzero_and_keeps_the_error_visible(tmp_path):
    run = tmp_path / "bad"
    r = run_cli("run", "--params", TINY, "--out", run, "--dataset", tmp_path / "no-such-folder", check=False)
    assert r.returncode == 2
    assert "01_prepare failed" in r.stderr and "Traceback" not in r.stderr
    nb = json.loads((run / "01_prepare.ipynb").read_text())
    assert nb["metadata"]["papermill"]["exception"] is True
    assert "no-such-folder" in json.dumps([c.get("outputs") for c in nb["cells"]])
    assert read_stages(run)["01_prepare"]["status"] == "failed" and "02_train" not in read_stages(run)
