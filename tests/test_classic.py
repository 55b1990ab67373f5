"""The classic models' table on ML-100K, pinned the way Microsoft Recommenders pins its notebooks' metrics:
the default time split of `movierec data`, the models fitted on the training ratings, EVERY test rating
scored. No language model; seconds. A change of split, of fitting or of metric moves these figures."""
import numpy as np
import pytest

from movierec.classic import CLASSIC_FILE, fit_classic, load_classic, save_classic
from movierec.data import load_movielens, split_by_time
from movierec.evaluate import rating_metrics
from movierec.prompts import PrepareConfig, load_prepared, prepare

# measured 2026-11-26: scikit-surprise 1.1.5, SVD(random_state=42), 80,808 training and 9,596 test ratings
# (SVDpp(random_state=42), item- and user-based KNNBaseline with pearson_baseline similarity the same day)
PINNED = {"global_mean": (1.2383, 1.0306), "user_mean": (1.1743, 0.9396), "movie_mean": (1.0873, 0.8722),
          "bias": (1.0188, 0.8151), "svd": (1.0078, 0.8020), "svdpp": (0.9842, 0.7799), "knn_baseline": (1.0104, 0.7985),
          "knn_user": (0.9931, 0.7856)}
TOL = 0.005


@pytest.fixture(scope="module")
def table(ml100k_dir, tmp_path_factory):
    cfg = PrepareConfig(template="compact")  # the split and the classic models do not depend on the prompt (and compact needs no classic fits)
    out = tmp_path_factory.mktemp("data")
    prepare(cfg, out, ml=load_movielens(ml100k_dir))
    ratings = load_prepared(out)["ratings"]
    test = ratings[ratings.split == "test"]
    classic = fit_classic(ratings, seed=cfg.seed)
    return {name: rating_metrics(test.rating, m.predict_pairs(test.user_id, test.movie_id)) for name, m in classic.items()}


def test_every_test_rating_is_scored(table):
    assert {m["n"] for m in table.values()} == {9596} and {m["parse_failures"] for m in table.values()} == {0}


@pytest.mark.parametrize("name", list(PINNED))
def test_classic_rmse_and_mae_are_pinned(table, name):
    rmse, mae = PINNED[name]
    got = table[name]
    assert got["rmse"] == pytest.approx(rmse, abs=TOL), f"{name} RMSE {got['rmse']:.4f}, pinned {rmse}"
    assert got["mae"] == pytest.approx(mae, abs=TOL), f"{name} MAE {got['mae']:.4f}, pinned {mae}"


def test_the_classic_models_order_as_expected(table):
    rmse = {k: v["rmse"] for k, v in table.items()}
    assert rmse["svd"] < rmse["bias"] < rmse["movie_mean"] < rmse["user_mean"] < rmse["global_mean"]
    assert rmse["svdpp"] < rmse["svd"] and rmse["knn_baseline"] < rmse["bias"]


def test_classic_models_are_saved_and_reused(ml100k_dir, tmp_path):
    "What `save_classic` writes, `load_classic` gives back: the same estimates, without fitting again."
    sr = split_by_time(load_movielens(ml100k_dir).ratings)
    models = fit_classic(sr, seed=42, names=["bias", "svd", "knn_baseline"])
    back = load_classic(save_classic(models, tmp_path / CLASSIC_FILE))
    test = sr[sr.split == "test"].head(500)
    for name, m in models.items():
        assert np.array_equal(back[name].predict_pairs(test.user_id, test.movie_id), m.predict_pairs(test.user_id, test.movie_id))


# the global split (one pair of cut-off times): 79,999 training and 1,382 test ratings, measured the same day
PINNED_GLOBAL = {"bias": 1.0227, "svd": 1.0006, "svdpp": 0.9753, "knn_baseline": 0.9865, "knn_user": 0.9930}


def test_global_split_table(ml100k_dir):
    sr = split_by_time(load_movielens(ml100k_dir).ratings, split="global")
    test = sr[sr.split == "test"]
    assert (len(test), int((sr.split == "train").sum())) == (1382, 79999)
    for name, m in fit_classic(sr, seed=42, names=list(PINNED_GLOBAL)).items():
        got = rating_metrics(test.rating, m.predict_pairs(test.user_id, test.movie_id))["rmse"]
        assert got == pytest.approx(PINNED_GLOBAL[name], abs=TOL), f"{name} RMSE {got:.4f} on the global split, pinned {PINNED_GLOBAL[name]}"
