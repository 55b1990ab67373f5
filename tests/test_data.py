"""Loading every MovieLens layout, the bad-input errors, the leakage-free split and the example files."""
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from movierec.core import MovierecError
from movierec.data import detect_format, load_movielens, split_by_time, write_grouplens_100k
from movierec.prompts import (RATING_PREFIX, PrepareConfig, build_examples, load_prepared, prepare, prompt_context,
                              prompts_for_user)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from dataprep import examples_seed_way  # the seed's way: one filter and one merge per example, the slow reference

# the profile semantics these tests pin: the compact template, training targets spread over each history, profiles of
# every earlier rating (the hybrid templates, recent targets and training-only profiles: tests/test_hybrid.py)
COMPACT = PrepareConfig(template="compact", train_targets="spread", history="before")


@pytest.fixture(scope="module")
def ml(ml100k_dir):
    return load_movielens(ml100k_dir)


@pytest.fixture(scope="module")
def sr(ml):
    return split_by_time(ml.ratings)


@pytest.fixture(scope="module")
def ex(ml, sr):
    return build_examples(ml, sr, COMPACT)


@pytest.fixture(scope="module")
def gl_dir(ml, tmp_path_factory):
    "A small GroupLens-layout ML-100K (u.data, latin-1 u.item with genre flags): the first 30 users."
    return write_grouplens_100k(ml, tmp_path_factory.mktemp("gl") / "ml-100k-small", users=range(1, 31))


@pytest.fixture
def gl(gl_dir, tmp_path):
    "A fresh copy of the GroupLens fixture to break."
    return Path(shutil.copytree(gl_dir, tmp_path / "ml"))


def _csv_dir(ml, folder: Path, users=range(1, 31), half=True) -> Path:
    "ML-100K users in the CSV layout (ratings.csv/movies.csv), with half stars like latest-small/25M."
    folder.mkdir(parents=True, exist_ok=True)
    r = ml.ratings[ml.ratings.user_id.isin(users)].copy()
    if half: r["rating"] = np.where(r.index % 3 == 0, r.rating - 0.5, r.rating)
    r.rename(columns={"user_id": "userId", "movie_id": "movieId"}).to_csv(folder / "ratings.csv", index=False)
    m = ml.movies.assign(title=np.where(ml.movies.year.isna(), ml.movies.title, ml.movies.title + " (" + ml.movies.year.astype(str) + ")"),
                         genres=ml.movies.genres.map(lambda g: "|".join(g) or "(no genres listed)"))
    m.rename(columns={"movie_id": "movieId"})[["movieId", "title", "genres"]].to_csv(folder / "movies.csv", index=False)
    return folder


def _edit_line(path: Path, lineno: int, text: str, encoding="latin-1") -> None:
    lines = path.read_text(encoding=encoding).splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


def _error(path_or_name, *parts, **kw) -> str:
    with pytest.raises(MovierecError) as e:
        load_movielens(path_or_name, **kw)
    msg = str(e.value)
    for p in parts: assert p in msg, msg
    return msg


# --- loading every layout -------------------------------------------------------------------------

def test_recbole_layout(ml):
    assert ml.name == "ml-100k" and detect_format(ml.path) in ("recbole", "grouplens-100k") and ml.scale == (1, 5)
    assert len(ml.ratings) == 100_000 and ml.ratings.user_id.nunique() == 943 and len(ml.movies) == 1682
    assert ml.ratings.dtypes.astype(str).tolist() == ["int64", "int64", "float32", "int64"]
    toy = ml.movies.set_index("movie_id").loc[1]
    assert (toy.title, toy.year, toy.genres) == ("Toy Story", 1995, ["Animation", "Children's", "Comedy"])


def test_grouplens_100k_layout_matches_recbole(ml, gl_dir):
    g = load_movielens(gl_dir)
    assert detect_format(gl_dir) == "grouplens-100k" and g.name == "ml-100k-small" and g.scale == (1, 5)
    want = ml.ratings[ml.ratings.user_id <= 30].sort_values(["user_id", "movie_id"], ignore_index=True)
    pd.testing.assert_frame_equal(g.ratings.sort_values(["user_id", "movie_id"], ignore_index=True), want)
    gm, mm = g.movies.set_index("movie_id"), ml.movies.set_index("movie_id")
    assert (gm.year.fillna(0) == mm.year.fillna(0)).all() and (gm.genres == mm.genres).all()
    assert (gm.title == mm.title).mean() > 0.99  # titles with characters outside latin-1 come back as "?"


def test_grouplens_1m_layout(ml, tmp_path):
    r = ml.ratings[ml.ratings.user_id <= 20]
    lines = [f"{a}::{b}::{int(c)}::{d}" for a, b, c, d in r.itertuples(index=False)]
    (tmp_path / "ratings.dat").write_text("\n".join(lines) + "\n")
    mv = [f"{m.movie_id}::{m.title}" + ("" if pd.isna(m.year) else f" ({m.year})") + "::" + ("|".join(m.genres) or "unknown")
          for m in ml.movies.itertuples()]
    (tmp_path / "movies.dat").write_bytes(("\n".join(mv) + "\n").encode("latin-1", errors="replace"))
    got = load_movielens(tmp_path)
    assert detect_format(tmp_path) == "grouplens-1m" and got.scale == (1, 5) and len(got.ratings) == len(r)
    assert got.movies.set_index("movie_id").loc[1, "title"] == "Toy Story"


def test_csv_layout_half_stars(ml, tmp_path):
    d = _csv_dir(ml, tmp_path / "ml-latest-small")
    got = load_movielens(d)
    assert detect_format(d) == "csv" and got.scale == (0.5, 5) and (got.ratings.rating % 1 == 0.5).any()
    assert got.movies.set_index("movie_id").loc[1, "year"] == 1995
    # half stars round half up to a whole star in the response; the rating column keeps the true value
    ex = build_examples(got, split_by_time(got.ratings), COMPACT, splits=("test",))["test"]
    st = ex.response.str.extract(r"Rating Prediction: (\d)/5")[0].astype(int)
    assert (st == np.clip(np.floor(ex.rating + 0.5), 1, 5)).all() and (ex.rating % 1 == 0.5).any()


def test_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MOVIEREC_DATA", str(tmp_path))  # an empty data dir: nothing may be downloaded
    _error("ml-1m", "--download")
    _error("no-such-dataset", "neither a folder nor a dataset name")
    _error(tmp_path, "holds no MovieLens ratings file")


# --- bad input: each gives a clear error naming file, line and field ---------------------------------

def test_missing_and_extra_columns(ml, gl, tmp_path):
    d = _csv_dir(ml, tmp_path / "csv")
    r = pd.read_csv(d / "ratings.csv")
    r.drop(columns="timestamp").to_csv(d / "ratings.csv", index=False)
    _error(d, "ratings.csv", "line 1 (header)", "missing column(s) timestamp")
    r.assign(tag="x").to_csv(d / "ratings.csv", index=False)
    _error(d, "ratings.csv", "unexpected column(s) tag")
    (gl / "u.data").write_text("1\t2\t3\n1\t3\t4\n")
    _error(gl, "u.data", "line 1", "3 fields, expected 4")
    _edit_line(gl / "u.data", 1, "1\t2\t3\t881250949")
    _edit_line(gl / "u.data", 2, "1\t3\t4\t881250949\t7")
    _error(gl, "u.data", "line 2 has 5 fields")


def test_missing_field(gl):
    _edit_line(gl / "u.data", 4, "1\t3\t\t881250949")
    _error(gl, "u.data", "line 4", "field rating is missing")


def test_non_numeric_values(gl, ml, tmp_path):
    _edit_line(gl / "u.data", 3, "1\t2\tfour\t881250949")
    _error(gl, "u.data", "line 3, field rating", "'four' is not a number")
    d = _csv_dir(ml, tmp_path / "csv")
    _edit_line(d / "ratings.csv", 7, "1,abc,3.5,881250949", encoding="utf-8")
    _error(d, "ratings.csv", "line 7, field movieId")


def test_ratings_outside_scale(gl, ml, tmp_path):
    _edit_line(gl / "u.data", 5, "1\t2\t6\t881250949")
    _error(gl, "u.data", "line 5, field rating", "outside this dataset's scale 1-5")
    d = _csv_dir(ml, tmp_path / "csv")
    _edit_line(d / "ratings.csv", 2, "1,1,0,881250949", encoding="utf-8")
    _error(d, "ratings.csv", "line 2, field rating", "scale 0.5-5")


def test_duplicates_keep_latest(gl, caplog):
    lines = (gl / "u.data").read_text().splitlines()
    u, m, r, t = lines[0].split("\t")
    new = 5 if r != "5" else 4
    (gl / "u.data").write_text("\n".join(lines + [f"{u}\t{m}\t{new}\t{int(t) + 10}", f"{u}\t{m}\t1\t{int(t) - 10}"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="movierec"):
        got = load_movielens(gl)
    assert len(got.ratings) == len(lines) and not got.ratings.duplicated(["user_id", "movie_id"]).any()
    kept = got.ratings[(got.ratings.user_id == int(u)) & (got.ratings.movie_id == int(m))]
    assert kept.timestamp.tolist() == [int(t) + 10] and kept.rating.tolist() == [new]
    assert "2 duplicate (user, movie) ratings" in got.notes[0] and "kept the latest" in got.notes[0]
    assert "first at line 1)" in got.notes[0] and any("duplicate" in rec.message for rec in caplog.records)


def test_unknown_movie(gl):
    _edit_line(gl / "u.data", 6, "1\t99999\t3\t881250949")
    _error(gl, "u.data", "line 6, field movie_id", "movie 99999 is not in the movie list")


def test_empty_files(gl, ml, tmp_path):
    (gl / "u.data").write_text("")
    _error(gl, "u.data is empty")
    d = _csv_dir(ml, tmp_path / "csv")
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    _error(d, "ratings.csv has a header but no data rows")
    d = _csv_dir(ml, tmp_path / "csv2")
    (d / "movies.csv").write_text("movieId,title,genres\n")
    _error(d, "movies.csv has a header but no movies")
    (gl / "u.data").write_text("1\t1\t3\t881250949\n")
    (gl / "u.item").unlink()
    _error(gl, "u.item is missing")


def test_wrong_encoding(gl, ml, tmp_path):
    d = _csv_dir(ml, tmp_path / "csv")
    text = (d / "movies.csv").read_text(encoding="utf-8").splitlines()
    text[9] = '9,"Caf\u00e9 (1995)",Drama'
    (d / "movies.csv").write_bytes(("\n".join(text) + "\n").encode("latin-1", errors="replace"))
    _error(d, "movies.csv, line 10", "not valid utf-8", "re-save")
    (gl / "u.data").write_bytes((gl / "u.data").read_text().encode("utf-16"))
    _error(gl, "u.data", "UTF-16")
    (gl / "u.data").write_text("1\t1\t3\t881250949\n")
    (gl / "u.item").write_bytes((gl / "u.item").read_text(encoding="latin-1").encode("utf-16"))
    _error(gl, "u.item", "UTF-16")


# --- splitting and examples without leakage ------------------------------------------------------

def test_split_by_time(sr):
    assert sr.split.value_counts().to_dict() == {"train": 80_808, "val": 9_596, "test": 9_596}
    t = sr.groupby(["user_id", "split"], observed=True).timestamp.agg(["min", "max"]).unstack()
    assert (t[("max", "train")] <= t[("min", "val")]).all() and (t[("max", "val")] <= t[("min", "test")]).all()
    # ties are broken by movie_id, not by file order: shuffling the input changes nothing
    again = split_by_time(sr.drop(columns="split").sample(frac=1, random_state=1))
    assert (again.split.values == sr.split.values).all()
    assert (split_by_time(sr.drop(columns="split"), min_ratings=10_000).split == "train").all()
    with pytest.raises(MovierecError): split_by_time(sr, val_frac=0.5, test_frac=0.6)


def test_split_global(ml):
    "One pair of cut-off times for everybody: no training rating after any val/test rating, of anybody."
    g = split_by_time(ml.ratings, split="global")
    t = g.groupby("split", observed=True).timestamp.agg(["min", "max"])
    assert t.loc["train", "max"] < t.loc["val", "min"] and t.loc["val", "max"] < t.loc["test", "min"]
    assert (g.split == "train").sum() == (ml.ratings.timestamp < t.loc["val", "min"]).sum()  # every earlier rating trains
    n_train = g[g.split == "train"].groupby("user_id").size()
    assert g[g.split != "train"].user_id.map(n_train).ge(5).all() and (g.split == "test").sum() >= 1000
    with pytest.raises(MovierecError, match="choose one of user, global"): split_by_time(ml.ratings, split="random")


def test_no_leakage_on_ml100k(ml, sr, ex):
    "Every example's history is the user's ratings strictly before the target; movie stats only earlier training ratings."
    allx = pd.concat([ex[k].assign(split=k) for k in ("train", "val", "test")], ignore_index=True)
    # history_len == number of the user's ratings strictly before the target time, for every example
    r = sr.sort_values(["user_id", "timestamp"])
    n_before = r.groupby("user_id").timestamp.apply(lambda ts: np.asarray(ts))
    want = [int(np.searchsorted(n_before[u], t, "left")) for u, t in zip(allx.user_id, allx.timestamp)]
    assert (allx.history_len.to_numpy() == np.asarray(want)).all()
    # movie_count == training ratings of that movie strictly before the target time (so never the target itself)
    tr = sr[sr.split == "train"].sort_values(["movie_id", "timestamp"])
    by_movie = tr.groupby("movie_id").timestamp.apply(lambda ts: np.asarray(ts))
    want = [int(np.searchsorted(by_movie[m], t, "left")) if m in by_movie.index else 0 for m, t in zip(allx.movie_id, allx.timestamp)]
    assert (allx.movie_count.to_numpy() == np.asarray(want)).all()
    # the future cannot change a prompt: rewrite every val/test rating, then every user's last test ratings
    fut = sr.copy()
    fut.loc[fut.split != "train", "rating"] = 6 - fut.loc[fut.split != "train", "rating"]
    ex2 = build_examples(ml, fut, COMPACT, splits=("train",))
    assert (ex2["train"].prompt.values == ex["train"].prompt.values).all()
    # each user's test ratings at their last timestamp: in no history (strictly before) and in no movie statistics
    last = (sr.groupby("user_id").timestamp.transform("max") == sr.timestamp) & (sr.split == "test")
    fut = sr.copy(); fut.loc[last, "rating"] = 6 - fut.loc[last, "rating"]
    ex3 = build_examples(ml, fut, COMPACT, splits=("test",))
    assert (ex3["test"].prompt.values == ex["test"].prompt.values).all()


def test_vectorized_matches_seed_way(ml, sr, ex):
    "The vectorized builder and the one-filter-per-example reference give the same prompts, train included."
    ref = examples_seed_way(ml, sr, [1, 2, 7, 13, 500], COMPACT.replace(min_history=10), splits=("train", "val", "test"))
    allx = pd.concat([ex[k] for k in ("train", "val", "test")])
    got = allx.merge(ref, on=["user_id", "movie_id", "timestamp"], suffixes=("", "_ref"))
    assert len(got) >= 250 and (got.prompt == got.prompt_ref).all()
    # of each user's eligible training targets (history >= 10), min(eligible, 50) are kept
    n_train_ref = ref.merge(sr[sr.split == "train"], on=["user_id", "movie_id", "timestamp"]).groupby("user_id").size()
    n_train = ex["train"][ex["train"].user_id.isin(n_train_ref.index)].groupby("user_id").size()
    assert (n_train == np.minimum(n_train_ref, 50)).all()
    # the first 20 users' validation and test targets, every one of them (moved from the prompts notebook)
    ref = examples_seed_way(ml, sr, range(1, 21), COMPACT)
    got = pd.concat([ex["val"], ex["test"]]).merge(ref, on=["user_id", "movie_id", "timestamp"], suffixes=("", "_ref"))
    assert len(got) == len(ref) > 50 and (got.prompt == got.prompt_ref).all()


def test_examples_shape(ml, sr, ex):
    assert {k: len(v) for k, v in ex.items()} == {"train": len(ex["train"]), "val": 9_596, "test": 9_596}
    assert ex["train"].history_len.min() >= 10 and ex["train"].groupby("user_id").size().max() == 50
    for df in ex.values():
        assert df.response.str.fullmatch(r"Rating Prediction: [1-5]/5").all()
        assert not df.prompt.str.contains(RATING_PREFIX).any() and not df.prompt.str.contains("<|im_start|>", regex=False).any()
        assert (df.prompt.str.rfind("Movie: ") > df.prompt.str.rfind("Genres liked")).all()  # the movie comes last
    # smaller chunks of users give the same examples
    small = build_examples(ml, sr, COMPACT, rows_per_chunk=7_000)
    for k in ex: assert (small[k].prompt.values == ex[k].prompt.values).all()
    # millisecond timestamps (beyond 32 bits) give the same examples
    ms = build_examples(ml, sr.assign(timestamp=sr.timestamp * 1000), COMPACT, splits=("test",))
    assert (ms["test"].prompt.values == ex["test"].prompt.values).all()
    # the seed picks which training windows are kept; it changes nothing else
    other = build_examples(ml, sr, COMPACT.replace(seed=1), splits=("train", "test"))
    pairs = lambda df: set(zip(df.user_id, df.movie_id))
    assert len(other["train"]) == len(ex["train"]) and pairs(other["train"]) != pairs(ex["train"])
    assert (other["test"].prompt.values == ex["test"].prompt.values).all()


def test_seed_template_and_reasoning(ml, sr):
    s = build_examples(ml, sr[sr.user_id <= 5], PrepareConfig(template="seed"), splits=("test",), reasoning=True)["test"]
    p = s.prompt.iloc[0]
    assert "User Profile:" in p and p.endswith("- Plot: Not available") and "- Title: " in p
    assert s.response.str.match(r"Rating Prediction: [1-5]/5\nReasoning: .+\nConfidence: (High|Medium|Low)$").all()
    with pytest.raises(MovierecError, match="Unknown prompt template"):
        build_examples(ml, sr, PrepareConfig.build({"template": "fancy"}))
    with pytest.raises(MovierecError, match="Unknown prompt template"):
        prompt_context(ml, sr, "fancy")


def test_prompts_for_user(ml, sr, ex):
    row = ex["test"].iloc[17]
    assert prompts_for_user(ml, sr, row.user_id, [row.movie_id], "compact", at_time=row.timestamp, history="before") == [row.prompt]
    ps = prompts_for_user(ml, sr, 1, [1, 50, 181], "compact")
    assert len({p[:p.rindex("Movie: ")] for p in ps}) == 1 and "Star Wars" in ps[1]
    with pytest.raises(MovierecError, match="User 99999"): prompts_for_user(ml, sr, 99999, [1])
    with pytest.raises(MovierecError, match="movie 99999"): prompts_for_user(ml, sr, 1, [99999])


def test_prepare_and_load_prepared(ml, ex, tmp_path):
    out = tmp_path / "data"
    meta = prepare(COMPACT.replace(dataset="ml-100k"), out)
    assert sorted(p.name for p in out.iterdir()) == ["data.json", "movies.parquet", "ratings.parquet",
                                                      "test.parquet", "train.parquet", "val.parquet"]
    d = load_prepared(out)
    assert meta == d["meta"] and d["meta"]["examples"] == {k: len(ex[k]) for k in ("train", "val", "test")}
    assert d["meta"]["params"]["min_history"] == 10 and d["meta"]["prompt_bytes"]["test"]["max"] > 200
    for k in ("train", "val", "test"):
        assert list(d[k].columns[:7]) == ["user_id", "movie_id", "timestamp", "rating", "history_len", "prompt", "response"]
        assert (d[k].prompt.values == ex[k].prompt.values).all()
    # baselines train on exactly the training ratings and are scored on exactly the test examples
    assert len(d["ratings"]) == 100_000
    test_pairs = d["ratings"][d["ratings"].split == "test"][["user_id", "movie_id"]]
    assert len(test_pairs.merge(d["test"], on=["user_id", "movie_id"])) == len(d["test"]) == len(test_pairs)
    assert isinstance(d["movies"].genres.iloc[0], list)
    with pytest.raises(MovierecError, match="run `movierec data"): load_prepared(tmp_path / "nothing")
