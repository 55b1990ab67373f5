"""Experiment trackers: a missing one is named before any work, MLflow (a local file store) and TensorBoard get the run end to end.

The trackers are movierec's `tracking` extra (`pip install -e '.[tracking]'`); `make test` installs them from
requirements.lock. Each run is `movierec train` as a user runs it, on `tiny-llama` and real ML-100K prompts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from movierec.model import TINY
from movierec.train import log_metrics_to_tracker

ENV = {**os.environ, "MOVIEREC_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
KNOBS = dict(base_model=TINY, max_steps=6, save_steps=3, val_examples=16, learning_rate=0.02, logging_steps=1, batch_size=8)

HIDE_MLFLOW = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **kw: None if name == "mlflow" else find_spec(name, *a, **kw)  # as if not installed
from movierec.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ml100k_prepared) -> Path:
    "64 training and 16 validation examples of real ML-100K prompts, in the layout `prepare` writes."
    d = ml100k_prepared
    small = tmp_path_factory.mktemp("small")
    for split, n in (("train", 64), ("val", 16)):
        d[split].sample(n, random_state=0).reset_index(drop=True).to_parquet(small / f"{split}.parquet")
    return small


def train_args(data, out, **knobs) -> list[str]:
    flags = [a for k, v in {**KNOBS, **knobs}.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return ["train", "--data", str(data), "--out", str(out), *flags]


def test_missing_tracker_is_named_before_any_work(tmp_path):
    out = tmp_path / "adapter"
    res = subprocess.run([sys.executable, "-c", HIDE_MLFLOW, *train_args(tmp_path / "no-such-data", out, report_to="mlflow")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "needs the mlflow package" in res.stderr and "pip install -e '.[tracking]'" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()   # said before the data, the model or the folder


def test_mlflow_file_store_end_to_end(prepared, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is movierec's `tracking` extra: pip install -e '.[tracking]'")
    from mlflow import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3.7+ asks for it to use a folder of files
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run is found through train.json
    store, out = tmp_path / "mlruns", tmp_path / "adapter"
    env = {**ENV, "MLFLOW_TRACKING_URI": f"file:{store}", "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": "movierec-test"}
    res = subprocess.run([sys.executable, "-m", "movierec.cli", *train_args(prepared, out, report_to="mlflow")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train.json").read_text())
    where = summary["tracking"]
    assert where["tracker"] == "mlflow" and where["tracking_uri"] == f"file:{store}"
    client = MlflowClient(tracking_uri=f"file:{store}")
    exp = client.get_experiment_by_name("movierec-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [where["run_id"]] and runs[0].info.status == "FINISHED"
    run = runs[0]
    # the run's final figures are train.json's
    assert run.data.metrics["final/train_loss"] == pytest.approx(summary["train_loss"])
    assert run.data.metrics["final/val_loss"] == pytest.approx(summary["val_loss"])
    assert run.data.metrics["final/steps"] == 6 and run.data.metrics["final/tokens_per_s"] == pytest.approx(summary["tokens_per_s"])
    # the Trainer's own logs: the loss at every step, the validation loss at each checkpoint
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [3, 6]
    assert run.data.params["movierec.lora_rank"] == "16" and run.data.params["movierec.base_model"] == TINY
    assert (store / exp.experiment_id / run.info.run_id / "metrics" / "final").is_dir()   # written where it was told, as files
    # later figures (the evaluation's) join the same run
    assert log_metrics_to_tracker(out, {"lora": {"rmse": 1.01, "mae": 0.8}, "n": 300}, prefix="eval/") == 3
    assert client.get_run(run.info.run_id).data.metrics["eval/lora/rmse"] == 1.01


def test_tensorboard_end_to_end(prepared, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is movierec's `tracking` extra: pip install -e '.[tracking]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "adapter"
    res = subprocess.run([sys.executable, "-m", "movierec.cli", *train_args(prepared, out, report_to="tensorboard")],
                         env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train.json").read_text())
    assert summary["tracking"] == {"tracker": "tensorboard", "log_dir": str(out / "tensorboard")}
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6] and "eval/loss" in scalars
    assert events.Scalars("final/val_loss")[0].value == pytest.approx(summary["val_loss"])
