"""The hybrid template's collaborative signal without leakage: a training prompt never quotes a number fitted on
its own rating (checked by refitting every model with that rating rewritten), validation and test prompts read
only training ratings, on the per-user and the global split; the fitted models are saved and reused."""
import numpy as np
import pandas as pd
import pytest

from movierec.classic import CLASSIC_FILE, CLASSIC_NAMES, fit_classic, load_classic
from movierec.data import MovieLens, load_movielens, split_by_time
from movierec.prompts import KEY, PrepareConfig, build_examples, load_prepared, prepare, prompt_context, prompts_for_user

CFG = dict(template="hybrid", train_targets="recent", history="train", folds=2)


@pytest.fixture(scope="module")
def ml(ml100k_dir):
    "The first 200 users of ML-100K: the models refit in seconds."
    full = load_movielens(ml100k_dir)
    return MovieLens(full.name, full.ratings[full.ratings.user_id <= 200].reset_index(drop=True), full.movies, full.scale, full.path)


def _build(ml, sr, cfg):
    ctx = prompt_context(ml, sr, cfg.template, cfg.history)
    return build_examples(ml, sr, cfg, ctx=ctx), ctx


def _rewrite(sr, keys):
    "`sr` with the ratings of (user, movie) `keys` moved far away (1 <-> 5)."
    out = sr.copy()
    at = out.set_index(KEY).index.isin(keys)
    out.loc[at, "rating"] = np.where(out.rating[at] >= 3, 1.0, 5.0).astype(np.float32)
    return out


@pytest.mark.parametrize("split", ["user", "global"])
def test_no_training_prompt_quotes_its_own_rating(ml, split):
    cfg = PrepareConfig(**CFG, split=split)
    sr = split_by_time(ml.ratings, split=split)
    ex, ctx = _build(ml, sr, cfg)
    assert len(ex["train"]) > 100 and len(ex["test"]) > 50
    # a handful of training targets of one fold, one per user (so no picked rating is in another's history)
    fold = ctx.signal.fold_of(ex["train"].user_id)
    pick = ex["train"][fold == 0].groupby("user_id").head(1).sample(6, random_state=0)
    keys = pick.set_index(KEY).index
    # refit everything (the fold models, the similarity, the full models) with those ratings rewritten
    ex2, ctx2 = _build(ml, _rewrite(sr, keys), cfg)
    again = ex2["train"].set_index(KEY).loc[keys]
    assert again.prompt.tolist() == pick.prompt.tolist()  # numbers fitted without them: unchanged
    assert again.rating.tolist() != pick.rating.tolist()
    # teeth: a model fitted on all training ratings (as a leaky prompt would quote) does move with them
    full = lambda c: c.signal.full["svdpp"].predict_pairs(pick.user_id, pick.movie_id)
    assert np.abs(full(ctx2) - full(ctx)).max() > 0.05
    # and the prompts of other targets that read the full models (val/test) change somewhere
    assert (ex2["test"].prompt.to_numpy() != ex["test"].prompt.to_numpy()).any()


@pytest.mark.parametrize("split", ["user", "global"])
def test_val_and_test_prompts_read_only_training_ratings(ml, split):
    cfg = PrepareConfig(**CFG, split=split)
    sr = split_by_time(ml.ratings, split=split)
    ex, _ = _build(ml, sr, cfg)
    vt = sr.copy()
    later = vt.split != "train"
    vt.loc[later, "rating"] = (6 - vt.rating[later]).astype(np.float32)
    ex2, _ = _build(ml, vt, cfg)
    for k in ("train", "val", "test"):
        assert (ex2[k].prompt.to_numpy() == ex[k].prompt.to_numpy()).all(), k
    # a test target's profile counts only the user's training ratings (strictly before its time)
    tr = sr[sr.split == "train"].groupby("user_id").timestamp.apply(np.sort)
    want = [int(np.searchsorted(tr.get(u, np.zeros(0)), t, "left")) for u, t in zip(ex["test"].user_id, ex["test"].timestamp)]
    assert (ex["test"].history_len.to_numpy() == np.asarray(want)).all()


def test_recent_targets_look_like_test_targets(ml):
    sr = split_by_time(ml.ratings)
    spread = build_examples(ml, sr, PrepareConfig(template="compact", train_targets="spread", history="train"), splits=("train", "test"))
    recent = build_examples(ml, sr, PrepareConfig(template="compact", train_targets="recent"), splits=("train",))["train"]
    test_len = spread["test"].history_len.median()
    assert recent.history_len.median() > 0.8 * test_len > spread["train"].history_len.median()
    # about as many per user as the user's test ratings (one off at most: rounding, ratings in the same second), the latest
    gap = recent.groupby("user_id").size() - spread["test"].groupby("user_id").size().clip(upper=50)
    assert gap.abs().max() <= 1 and (gap == 0).mean() > 0.5
    last_train = sr[sr.split == "train"].groupby("user_id").timestamp.max()
    assert (recent.groupby("user_id").timestamp.max() == last_train.loc[recent.user_id.unique()]).all()


def test_prepare_saves_the_models_that_serve_the_prompts(ml, tmp_path):
    meta = prepare(PrepareConfig(folds=2), tmp_path, ml=ml)  # the defaults: hybrid_lean, recent targets, training-only profiles
    assert meta["params"]["template"] == "hybrid_lean" and meta["params"]["train_targets"] == "recent"
    assert meta["classic"]["quoted"] == ["svdpp", "knn_baseline", "knn_user"] and (tmp_path / CLASSIC_FILE).exists()
    assert meta["classic"]["models"] == list(CLASSIC_NAMES)  # every classic model, for evaluation to reuse
    d, classic = load_prepared(tmp_path), load_classic(tmp_path)
    ratings = d["ratings"]
    for row in d["test"].sample(5, random_state=1).itertuples():
        got = prompts_for_user(ml, ratings, row.user_id, [row.movie_id], at_time=row.timestamp, classic=classic)
        assert got == [row.prompt]
    # the saved models are what evaluation would fit (same seed): it can load them instead of fitting again
    t = d["test"].head(200)
    again = fit_classic(ratings, seed=PrepareConfig().seed, names=["svd", "svdpp", "knn_user"])
    for name, m in again.items():
        assert np.allclose(m.predict_pairs(t.user_id, t.movie_id), classic[name].predict_pairs(t.user_id, t.movie_id)), name
    # a template without the signal fits and writes nothing
    assert prepare(PrepareConfig(template="compact"), tmp_path / "compact", ml=ml)["classic"] is None
    assert not (tmp_path / "compact" / CLASSIC_FILE).exists()
