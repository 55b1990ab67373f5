"""Continual updates (issue 17, item 2): `movierec update` continues a run's adapter on later ratings, with no leakage.

A parent run A is the first 60 users of ML-100K cut at T (the 60% quantile of their rating times), prepared with a
global split and trained 2 steps on `tiny-llama`; the updates add the ratings in (T, T2] and test after T2. Training
runs go through the real command line. Run under the CPU lock: `flock /tmp/movierec-cpu.lock pytest tests/test_update.py`.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from movierec.core import MOVIEREC_JSON, MovierecError, RunLayout
from movierec.data import MovieLens, load_movielens, write_grouplens_100k
from movierec.model import TINY
from movierec.params import Params
from movierec.prompts import PrepareConfig, prepare, read_examples
from movierec.train import TrainConfig, train
from movierec.update import UpdateConfig, data_until, new_ratings, prepare_update, time_cut

ENV = {**os.environ, "MOVIEREC_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "movierec.cli", *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, ml100k_dir):
    "The dataset slice (a GroupLens folder of its own), T, T2, and run A: the slice cut at T, prepared and trained 2 steps."
    root = tmp_path_factory.mktemp("update")
    full = load_movielens(ml100k_dir)
    ml = load_movielens(write_grouplens_100k(full, root / "ml-slice", users=range(1, 61)))
    T, T2 = (int(x) for x in np.quantile(ml.ratings.timestamp, [0.6, 0.8]))
    a = RunLayout(root / "A")
    prepare(PrepareConfig(split="global", seed=0, folds=2), a.data, ml=time_cut(ml, until=T))
    train(a.data, a.adapter, TrainConfig(base_model=TINY, max_steps=2, batch_size=4, val_examples=0, device="cpu"), progress=False)
    return {"root": root, "ml": ml, "T": T, "T2": T2, "a": a}


@pytest.fixture(scope="module")
def updated(parent):
    "Run B: `movierec update` of A with (T, T2] from A's own dataset, 3 steps, with replayed examples of A."
    b = RunLayout(parent["root"] / "B")
    r = cli("update", "--run", parent["a"].root, "--out", b.root, "--since", parent["T"], "--until", parent["T2"],
            "--update-examples", 24, "--replay", 0.25, "--update-max-steps", 3, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "update examples (+6 replayed), 3 steps" in r.stdout
    return b


def test_no_leakage(parent, updated):
    "Every update example's target is a new rating: after T and before the test period (after T2); tests are after T2."
    T, T2, b = parent["T"], parent["T2"], updated
    meta = json.loads((b.data / "data.json").read_text())["update"]
    ex = read_examples(b.data, "train")
    upd, replay = ex[~ex.replay], ex[ex.replay]
    assert len(upd) == 24 and len(replay) == 6
    assert (upd.timestamp > T).all(), "an update target at or before T: not a new rating"
    assert (upd.timestamp < meta["test_from"]).all() and (upd.timestamp < meta["val_from"]).all()
    assert meta["since"] == T and meta["test_from"] == T2 + 1 and meta["until"] == T2
    test = read_examples(b.data, "test")
    assert len(test) and (test.timestamp > T2).all()
    val = read_examples(b.data, "val")
    assert (val.timestamp >= meta["val_from"]).all() and (val.timestamp <= T2).all()
    assert not set(zip(upd.user_id, upd.movie_id)) & set(zip(test.user_id, test.movie_id))
    # replayed examples are A's own training examples, prompts unchanged
    a_train = read_examples(parent["a"].data, "train")
    assert set(replay.prompt) <= set(a_train.prompt)
    # B's ratings: A's knowledge and the slice's ratings up to T are training history; nothing after T2 trains
    r = pd.read_parquet(b.data / "ratings.parquet")
    assert (r[r.timestamp <= T].split == "train").all()
    assert (r[r.timestamp > T2].split == "test").all()
    # the classic models quoted in the update prompts never saw their targets: out of fold (as prepare's)
    assert json.loads((b.data / "data.json").read_text())["classic"]["quoted"]


def test_records_parent(parent, updated):
    "B records its parent in the adapter's movierec.json, data.json, stages.json and update.json; its adapter is A's, trained further."
    a, b = parent["a"], updated
    parent_dir = str(a.root.resolve())
    assert json.loads((b.adapter / MOVIEREC_JSON).read_text())["parent"] == str(a.adapter.resolve())
    assert json.loads((b.data / "data.json").read_text())["parent"] == parent_dir
    assert {s["parent"] for s in json.loads(b.stages.read_text()).values()} == {parent_dir}
    rec = json.loads((b.root / "update.json").read_text())
    assert rec["parent"] == parent_dir and rec["train"]["steps"] == 3 and rec["train"]["n_train"] == 30
    p = Params.load(b.params)
    assert p.prepare.template == json.loads((a.data / "data.json").read_text())["params"]["template"]
    wa, wb = load_file(a.adapter / "adapter_model.safetensors"), load_file(b.adapter / "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb) and any(not (wa[k] == wb[k]).all() for k in wa)
    # a chain: B's data ends at T2, so the next update's new ratings come after T2
    assert data_until(b.data) == parent["T2"]
    assert new_ratings(b.data, load_movielens(parent["root"] / "ml-slice"))[1].timestamp.min() > parent["T2"]


def test_updated_run_evaluates(updated):
    "B is a run folder like any other: `movierec evaluate` scores its test ratings (after T2) with its adapter."
    r = cli("evaluate", "--data", updated.data, "--adapter", updated.adapter, "--out", updated.root, "--eval-sample", 30,
            "--no-zero-shot", "--no-deploy", "--ranking-users", 0, "--blend", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(updated.metrics.read_text())
    assert m["sample"] == 30 and "lora" in {e["model"] for e in m["models"]}


def test_feed_of_new_ratings(parent, tmp_path):
    "A folder holding only the ratings after T (any layout) is a source; without --until its latest ratings are the test."
    ml, T = parent["ml"], parent["T"]
    feed = write_grouplens_100k(MovieLens("feed", ml.ratings[ml.ratings.timestamp > T], ml.movies, ml.scale), tmp_path / "feed")
    meta = prepare_update(parent["a"].data, tmp_path / "B", load_movielens(feed), UpdateConfig(since=T, update_examples=10))
    ex, test = read_examples(tmp_path / "B", "train"), read_examples(tmp_path / "B", "test")
    assert (ex.timestamp > T).all() and (ex.timestamp < meta["update"]["test_from"]).all()
    assert (test.timestamp >= meta["update"]["test_from"]).all() and meta["update"]["until"] < meta["update"]["test_from"]


def test_bad_input(parent, tmp_path):
    "Older ratings, unknown movies, another dataset and a second update into the same folder are one clear sentence, exit code 2."
    ml, T, a = parent["ml"], parent["T"], parent["a"]
    def run(ratings: MovieLens, *extra):
        folder = write_grouplens_100k(ratings, tmp_path / ratings.name)
        return cli("update", "--run", a.root, "--out", tmp_path / "B", "--ratings", folder, "--since", T, *extra)
    late = ml.ratings[ml.ratings.timestamp > T]
    old = pd.DataFrame({"user_id": [1], "movie_id": [1], "rating": [3.0], "timestamp": [T - 10**6]})
    r = run(MovieLens("older", pd.concat([old, late]), ml.movies, ml.scale))
    assert r.returncode == 2 and "at or before" in r.stderr and "Traceback" not in r.stderr
    movies = pd.concat([ml.movies, pd.DataFrame({"movie_id": [99999], "title": ["New Movie"], "year": [1998], "genres": [["Drama"]]})])
    r = run(MovieLens("unknown", pd.concat([late, late.head(1).assign(movie_id=99999)]), movies, ml.scale))
    assert r.returncode == 2 and "movie 99999" in r.stderr and "not in the run's movies" in r.stderr
    other = ml.movies.assign(title="Another " + ml.movies.title)
    r = run(MovieLens("other", late, other, ml.scale))
    assert r.returncode == 2 and "another dataset" in r.stderr
    r = cli("update", "--run", a.root, "--out", tmp_path / "B2", "--since", T, "--until", int(ml.ratings.timestamp.max()))
    assert r.returncode == 2 and "nothing to test on" in r.stderr
    r = cli("update", "--run", tmp_path / "nothing", "--out", tmp_path / "B3")
    assert r.returncode == 2 and "not a finished run" in r.stderr
    with pytest.raises(MovierecError, match="is not after"):
        prepare_update(a.data, tmp_path / "B4", ml, UpdateConfig(since=T, until=T))
