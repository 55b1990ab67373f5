"""Every `movierec` subcommand as a user runs it, asserting on what it prints (issue 12: `movierec data`
printed an empty list). `run` and `compare` are exercised the same way in tests/test_pipeline.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

MOVIEREC = str(Path(sys.executable).parent / "movierec")


def cli(*args, check=True):
    r = subprocess.run([MOVIEREC, *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"movierec {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    "A prepared ML-100K (two training windows per user) and a 2-step adapter on the tiny random Llama."
    d = tmp_path_factory.mktemp("cli")
    data = cli("data", "--out", d / "data", "--max-per-user", 2, "--seed", 0, "--template", "compact")
    train = cli("train", "--data", d / "data", "--out", d / "adapter", "--base-model", "tiny-llama", "--max-steps", 2,
                "--train-examples", 16, "--val-examples", 8, "--batch-size", 4, "--save-steps", 2, "--learning-rate", "1e-3")
    return d, data, train


def test_data_prints_what_it_wrote(work):
    d, r, _ = work
    meta = json.loads((d / "data" / "data.json").read_text())
    want = ", ".join(f"{s} {n:,}" for s, n in meta["examples"].items())
    assert f"ml-100k: 943 users, 1,682 movies; examples written to {d / 'data'}: {want}" in r.stdout, r.stdout
    assert all(meta["examples"][s] > 0 for s in ("train", "val", "test"))


def test_train_prints_its_summary(work):
    d, _, r = work
    block = r.stdout[r.stdout.rindex('{\n  "'):]                    # the summary: the last indented JSON object
    out = json.loads(block[: block.index("\n}") + 2])
    assert out["steps"] == 2 and out["n_train"] == 16 and out["train_loss"] > 0
    assert f"adapter written to {d / 'adapter'}" in r.stdout
    assert json.loads((d / "adapter" / "train.json").read_text())["steps"] == 2


def test_evaluate_prints_the_table(work):
    d, _, _ = work
    r = cli("evaluate", "--data", d / "data", "--adapter", d / "adapter", "--out", d / "eval", "--eval-sample", 12,
            "--no-deploy", "--ranking-users", 2, "--seed", 0)
    for model in ("global_mean", "bias", "svd", "lora", "zero_shot"):
        assert f"\n{model} " in r.stdout, r.stdout
    assert "12 test ratings scored by each model" in r.stdout and "rmse" in r.stdout
    assert {m["n"] for m in json.loads((d / "eval" / "metrics.json").read_text())["models"]} == {12}


def test_recommend_prints_top_k_as_table_and_json(work):
    d, _, _ = work
    r = cli("recommend", "--data", d / "data", "--adapter", d / "adapter", "--user", 1, "--top-k", 3, "--rerank-n", 20)
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert lines[0].split()[:2] == ["movie_id", "title"] and len(lines) == 4, r.stdout
    j = cli("recommend", "--data", d / "data", "--adapter", d / "adapter", "--likes", "Star Wars (1977); Fargo",
            "--top-k", 3, "--rerank-n", 20, "--json")
    recs = json.loads(j.stdout)
    assert len(recs) == 3 and {"movie_id", "title", "pred"} <= set(recs[0]) and all(1 <= x["pred"] <= 5 for x in recs)
    bad = cli("recommend", "--data", d / "data", "--adapter", d / "adapter", "--likes", "No Such Movie At All", check=False)
    assert bad.returncode == 2 and "No movie titled 'No Such Movie At All'" in bad.stderr and "Traceback" not in bad.stderr


def test_recommend_explain_prints_reasons_and_prompt_prints_the_model_input(work):
    d, _, _ = work
    r = cli("recommend", "--data", d / "data", "--adapter", d / "adapter", "--user", 1, "--top-k", 2, "--rerank-n", 5, "--explain")
    assert r.stdout.lstrip().startswith("1. ") and "predicted" in r.stdout and "itemknn rank" in r.stdout, r.stdout
    j = json.loads(cli("recommend", "--data", d / "data", "--adapter", d / "adapter", "--user", 1, "--top-k", 2, "--rerank-n", 0, "--json").stdout)
    assert {"similar_liked", "shared_genres", "retriever_rank"} <= set(j[0]), j[0]
    p = cli("prompt", "--data", d / "data", "--user", 1, "--movie", 50)
    assert p.stdout.startswith("Predict the user's rating (1-5) of the movie.") and "Star Wars" in p.stdout, p.stdout
    bad = cli("prompt", "--data", d / "data", "--user", 1, "--movie", 99999, check=False)
    assert bad.returncode == 2 and "Movie 99999 is not in" in bad.stderr


def test_tune_prints_the_best_trial(work):
    d, _, _ = work
    r = cli("tune", "--data", d / "data", "--out", d / "tune", "--trials", 1, "--base-model", "tiny-llama", "--max-steps", 1,
            "--train-examples", 8, "--val-examples", 0, "--val-sample", 8)
    assert "best of 1 trials: validation RMSE" in r.stdout and "tune.json" in r.stdout, r.stdout


@pytest.mark.slow
def test_deploy_prints_the_model_and_parity(work, ollama_server, base_gguf):
    from movierec.export import random_adapter
    d, _, _ = work
    adapter = random_adapter(d / "smol-adapter", base_gguf, layers=None)
    r = cli("deploy", "--adapter", adapter, "--out", d / "gguf", "--data", d / "data", "--parity-sample", 2,
            "--ollama-host", ollama_server.host, "--model-name", "movierec-cli")
    assert f"model 'movierec-cli' created at {ollama_server.host}; files in {d / 'gguf'}" in r.stdout, r.stdout
    parity = json.loads(r.stdout[r.stdout.index("{"):])["parity"]
    assert parity["adapter"]["n"] == 2 and parity["adapter"]["mean_abs_diff"] < 0.05
    ollama_server.client().delete("movierec-cli"); ollama_server.client().delete("movierec-cli-merged")


def test_setup_help_and_bad_knobs():
    r = cli("setup", "--help")
    assert "--no-ollama" in r.stdout and "--grouplens" in r.stdout
    bad = cli("train", "--data", "/nonexistent", "--out", "/tmp/x", "--lora-rank", "abc", "--batch-size", 0, check=False)
    assert bad.returncode == 2 and "lora_rank='abc' is not accepted" in bad.stderr and "batch_size=0" in bad.stderr
    assert "Traceback" not in bad.stderr
