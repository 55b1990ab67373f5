"""`movierec compare A B` (issue 17, item 3): two runs' predictions of the same test ratings, paired; each
difference with a paired bootstrap 95% interval and a verdict, per segment and for per-user ranking results;
runs scored on other ratings are refused, ranking tables ranked for other users are named and left out. Two small made-up run folders whose differences are checked by hand."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import bootstrap

from movierec.core import MovierecError, RunLayout
from movierec.evaluate import RANKING_USERS
from movierec.params import Params
from movierec.report import compare_runs, format_comparison

MOVIEREC = str(Path(sys.executable).parent / "movierec")

RATING = [5.0, 4.0, 3.0, 2.0, 1.0, 4.0]
GOOD = [4.5, 4.0, 3.5, 2.0, 1.5, 4.0]   # errors 0.5, 0, 0.5, 0, 0.5, 0: RMSE sqrt(0.75 / 6), MAE 0.25
OFF = [4.0, 3.0, 4.0, 3.0, 2.0, 3.0]    # every error 1: RMSE 1, MAE 1
SVD = [4.0, 4.0, 3.0, 3.0, 2.0, 3.0]


def make_run(root: Path, lm, other, rating=RATING, lora_rank=16, ranks=None) -> Path:
    "A run folder with params.yaml, predictions.parquet and, given `ranks`, ranking_users.parquet."
    run = RunLayout(root)
    root.mkdir(parents=True)
    Params().replace(lora_rank=lora_rank).save(run.params)
    pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "movie_id": [10, 11, 10, 12, 11, 13], "timestamp": range(6),
                  "rating": rating, "history_len": [5, 5, 150, 150, 150, 5], "genres": [["Drama"]] * 6,
                  "movie_train_ratings": [60, 3, 60, 60, 3, 3], "svd": SVD, "lora": lm, "other": other}
                 ).to_parquet(run.predictions)
    if ranks is not None:
        ranks = np.asarray(ranks)
        pd.DataFrame({"model": "lora", "user_id": np.arange(len(ranks)), "movie_id": 100 + np.arange(len(ranks)),
                      "rank": ranks, "hr@10": (ranks < 10).astype(float)}).to_parquet(root / RANKING_USERS)
    return root


@pytest.fixture
def runs(tmp_path):
    "A: lora off by 1 everywhere; B: lora close. `other` the other way round; svd the same in both. 40 users ranked."
    a = make_run(tmp_path / "A", OFF, GOOD, ranks=[15] * 20 + [3] * 20)
    b = make_run(tmp_path / "B", GOOD, OFF, lora_rank=8, ranks=[2] * 20 + [3] * 20)
    return a, b


def test_differences_verdicts_and_intervals_by_hand(runs, tmp_path):
    a, b = runs
    cmp = compare_runs(a, b, plot=tmp_path / "cmp.png", resamples=1000)
    assert (cmp.a, cmp.b, cmp.n) == ("A", "B", 6)
    assert cmp.params.to_dict("records") == [{"param": "lora_rank", "A": 16, "B": 8}]
    m = cmp.metrics.set_index(["model", "metric"])
    lora = m.loc["lora"]
    assert np.allclose(lora.loc["rmse", ["A", "B", "diff"]].astype(float), [1, np.sqrt(0.125), np.sqrt(0.125) - 1])
    assert np.allclose(lora.loc["mae", ["A", "B", "diff"]].astype(float), [1, 0.25, -0.75])
    assert np.allclose(lora.loc["within_0_5", ["A", "B", "diff"]].astype(float), [0, 1, 1])
    # every resample of the six ratings has A's lora off by 1 and B's by at most 0.5: the interval excludes 0
    assert lora.loc["rmse", "hi"] <= 0.5 - 1 and lora.loc["rmse", "lo"] >= -1
    assert lora.loc["rmse", "verdict"] == lora.loc["mae", "verdict"] == lora.loc["within_0_5", "verdict"] == "better"
    assert m.loc[("other", "rmse"), "verdict"] == "worse" and np.isclose(m.loc[("other", "rmse"), "diff"], 1 - np.sqrt(0.125))
    assert (m.loc["svd", "diff"] == 0).all() and (m.loc[("svd", "rmse"), ["lo", "hi"]] == 0).all()
    assert m.loc[("svd", "rmse"), "verdict"] == "no detectable difference"
    # the interval is scipy's paired percentile bootstrap of the same statistic, with the same seed
    sq_a, sq_b = (np.array(OFF) - RATING) ** 2, (np.array(GOOD) - RATING) ** 2
    ci = bootstrap((sq_a, sq_b), lambda x, y, axis=-1: np.sqrt(y.mean(axis)) - np.sqrt(x.mean(axis)), paired=True,
                   vectorized=True, n_resamples=1000, method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert np.allclose(lora.loc["rmse", ["lo", "hi"]].astype(float), [ci.low, ci.high])
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_segments_and_ranking_are_paired_too(runs):
    a, b = runs
    cmp = compare_runs(a, b, resamples=1000)
    s = cmp.segments[cmp.segments.model == "lora"].set_index(["segment", "bin"])
    assert list(s.index) == [("history", "0-19"), ("history", "100-199"), ("popularity", "0-9"), ("popularity", "50-99")]
    # history 0-19: ratings 1, 2, 6 (B's errors 0.5, 0, 0); popularity 0-9: ratings 2, 5, 6 (B's errors 0, 0.5, 0)
    assert np.isclose(s.loc[("history", "0-19"), "B"], np.sqrt(0.25 / 3)) and s.loc[("history", "0-19"), "n"] == 3
    assert np.isclose(s.loc[("popularity", "0-9"), "diff"], np.sqrt(0.25 / 3) - 1)
    assert (s.verdict == "better").all()
    r = cmp.ranking.set_index("metric")
    assert list(cmp.ranking.model.unique()) == ["lora"] and (r.n == 40).all()
    assert np.allclose(r.loc["rank", ["A", "B", "diff"]].astype(float), [9, 2.5, -6.5])
    assert np.allclose(r.loc["hr@10", ["A", "B", "diff"]].astype(float), [0.5, 1, 0.5])
    assert r.loc["rank", "verdict"] == r.loc["hr@10", "verdict"] == "better"
    text = format_comparison(cmp)
    for part in ("lora_rank", "RMSE by segment:", "ranking (per-user means):", "no detectable difference", "-0.6464 ["):
        assert part in text, part


def test_runs_on_other_test_ratings_are_refused(runs, tmp_path):
    a, _ = runs
    other_rating = make_run(tmp_path / "C", GOOD, OFF, rating=[5.0, 4.0, 3.0, 2.0, 1.0, 5.0])
    with pytest.raises(MovierecError, match=r"not scored on the same test ratings: 1 are only in A's predictions and 1 only in C's"):
        compare_runs(a, other_rating)
    fewer = make_run(tmp_path / "D", GOOD, OFF)
    pd.read_parquet(RunLayout(fewer).predictions).head(5).to_parquet(RunLayout(fewer).predictions)
    with pytest.raises(MovierecError, match="1 are only in A's predictions and 0 only in D's"):
        compare_runs(a, fewer)
    with pytest.raises(MovierecError, match="not a run folder"):
        compare_runs(a, tmp_path / "nowhere")


def test_ranking_tables_of_other_users_are_left_out_not_the_comparison(runs, tmp_path):
    "Runs with another sampled_users: their test ratings are still compared, the ranking table they filled differently is named and skipped."
    a, b = runs
    other_users = make_run(tmp_path / "E", GOOD, OFF, ranks=[1] * 39)
    cmp = compare_runs(a, other_users, plot=tmp_path / "ae.png", resamples=200)
    assert cmp.n == 6 and set(cmp.metrics.model) == {"svd", "lora", "other"}
    assert len(cmp.ranking) == 0 and cmp.unpaired == {"lora": "A ranked 40 users, E 39, 39 of them alike (another "
                                                      "ranking_users, sampled_users, cold_start_users or seed?)"}
    assert "ranking tables not compared (ranked for different users):\n  lora: A ranked 40 users, E 39" in format_comparison(cmp)
    assert compare_runs(a, b, resamples=200).unpaired == {}
    # a second table ranked alike in both runs is still compared beside the skipped one
    for run, n in ((a, 40), (other_users, 39)):
        t = pd.read_parquet(Path(run) / RANKING_USERS)
        alike = pd.DataFrame({"model": "sampled/lora", "user_id": range(5), "movie_id": 7, "rank": [1, 2, 3, 40, 50],
                              "hr@10": [1.0, 1, 1, 0, 0]})
        pd.concat([t, alike]).to_parquet(Path(run) / RANKING_USERS)
    cmp = compare_runs(a, other_users, resamples=200)
    assert set(cmp.ranking.model) == {"sampled/lora"} and (cmp.ranking.n == 5).all() and list(cmp.unpaired) == ["lora"]
    r = subprocess.run([MOVIEREC, "compare", str(a), str(other_users)], capture_output=True, text=True)
    assert r.returncode == 0 and "lora: A ranked 40 users, E 39, 39 of them alike" in r.stdout, r.stderr


def test_the_cli_prints_the_table_and_writes_the_plot(runs, tmp_path):
    a, b = runs
    r = subprocess.run([MOVIEREC, "compare", str(a), str(b), "--plot", str(tmp_path / "ab.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "better" in r.stdout and "lora_rank" in r.stdout and f"plot: {tmp_path / 'ab.png'}" in r.stdout
    assert (tmp_path / "ab.png").stat().st_size > 1000
    c = make_run(tmp_path / "C", GOOD, OFF, rating=[1.0] * 6)
    r = subprocess.run([MOVIEREC, "compare", str(a), str(c)], capture_output=True, text=True)
    assert r.returncode == 2 and "not scored on the same test ratings" in r.stderr and "Traceback" not in r.stderr
