"""Data preparation speed: the vectorized example builder against the seed's way, and a run at ML-25M's shape.

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/dataprep.py            # both parts
    flock /tmp/movierec-cpu.lock .venv/bin/python bench/dataprep.py --skip-25m # ML-100K ratio only
    .venv/bin/python bench/dataprep.py --skip-100k --scale 0.1                 # a tenth of ML-25M's shape

Part 1 builds every ML-100K example with `build_examples` and, in the same process, the seed's way
(`examples_seed_way` below: one boolean filter and one merge per example) on the first 100 users, and prints
examples/s of each and their ratio (goal >= 100x). Part 2 generates a synthetic ratings set with
ML-25M's shape (162,541 users, 62,423 movies, 25M half-star ratings, heavy-tailed activity, Zipf popularity)
and runs the whole `prepare` stage on it: split, examples for all three splits, Parquet files; it prints
the time and the peak RSS (goal <= 10 min and <= 8 GB on a 2-core machine).
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from movierec.data import MovieLens, load_movielens, split_by_time
from movierec.prompts import PrepareConfig, build_examples, prepare, profile_prompts, prompt_context


def examples_seed_way(ml: MovieLens, split_ratings: pd.DataFrame, user_ids, cfg: PrepareConfig | None = None,
                      splits=("val", "test")) -> pd.DataFrame:
    """Examples of `user_ids` built one at a time, as the seed did: a filter and a merge per example, then the same
    formatter. Slow but obviously right: the reference the vectorized `build_examples` must match prompt for prompt.
    Every target of `splits` is built (training targets only with `cfg.min_history` earlier ratings, none dropped)."""
    cfg = PrepareConfig() if cfg is None else cfg
    ctx = prompt_context(ml, split_ratings, cfg.template)
    rows = []
    for u in user_ids:
        targets = split_ratings[(split_ratings.user_id == u) & split_ratings.split.isin(list(splits))]
        for t in targets.itertuples():
            hist = split_ratings[(split_ratings.user_id == u) & (split_ratings.timestamp < t.timestamp)]
            hist = hist.merge(ml.movies[["movie_id"]], on="movie_id").sort_values(["timestamp", "movie_id"], kind="stable")
            if t.split == "train" and len(hist) < cfg.min_history: continue
            hist = hist.assign(movie_idx=ctx.movie_index(hist.movie_id.to_numpy()))
            prof = profile_prompts(ctx, hist, [0], [len(hist)], ctx.movie_index([t.movie_id]), [t.timestamp])
            rows.append((u, t.movie_id, t.timestamp, prof.prompt.iloc[0]))
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "timestamp", "prompt"])


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def bench_100k(n_users: int = 100) -> None:
    ml = load_movielens("ml-100k")
    sr = split_by_time(ml.ratings)
    t0 = time.perf_counter()
    ex = build_examples(ml, sr)
    t_vec = time.perf_counter() - t0
    n_vec = sum(map(len, ex.values()))
    users = sorted(sr.user_id.unique())[:n_users]
    t0 = time.perf_counter()
    ref = examples_seed_way(ml, sr, users, splits=("train", "val", "test"))
    t_seed = time.perf_counter() - t0
    v, s = n_vec / t_vec, len(ref) / t_seed
    print(f"ML-100K vectorized : {n_vec:>7,} examples (all {sr.user_id.nunique()} users) in {t_vec:6.2f} s = {v:>9,.0f} examples/s")
    print(f"ML-100K seed's way : {len(ref):>7,} examples (first {n_users} users)  in {t_seed:6.2f} s = {s:>9,.0f} examples/s")
    print(f"ratio: {v / s:,.0f}x (goal >= 100x)")


def synthetic_25m(scale: float = 1.0, seed: int = 0) -> MovieLens:
    "Ratings with ML-25M's shape: 162,541 users (>= 20 ratings each, heavy tail), 62,423 movies (Zipf popularity)."
    rng = np.random.default_rng(seed)
    n_users, n_movies, n_ratings = int(162_541 * scale), int(62_423 * max(scale, 0.1)), int(25_000_095 * scale)
    # activity: 20 + a log-normal tail (ML-25M: min 20, median 71, mean 154, max 32,202), rescaled to the total
    act = rng.lognormal(np.log(51), 1.39, n_users)
    per_user = 20 + np.floor(act / act.sum() * (n_ratings - 20 * n_users)).astype(np.int64)
    per_user = np.minimum(per_user, n_movies // 2)
    pop = 1.0 / np.arange(1, n_movies + 1) ** 0.9  # Zipf-like popularity
    pop /= pop.sum()
    # draw (user, movie) pairs, drop repeats (MovieLens has one rating per pair) and draw again for users still
    # short of their count; the last rounds draw uniformly so heavy users can reach rare movies
    pairs = pd.DataFrame({"user_id": np.zeros(0, np.int64), "movie_id": np.zeros(0, np.int64)})
    need = per_user.copy()
    for round_ in range(8):
        u = np.repeat(np.arange(1, n_users + 1, dtype=np.int64), np.ceil(need * 1.3).astype(np.int64))
        if not len(u): break
        m = (rng.choice(n_movies, size=len(u), p=pop) if round_ < 4 else rng.integers(0, n_movies, len(u))) + 1
        pairs = pd.concat([pairs, pd.DataFrame({"user_id": u, "movie_id": m.astype(np.int64)})]).drop_duplicates()
        pairs = pairs[pairs.groupby("user_id").cumcount().to_numpy() < per_user[pairs.user_id.to_numpy() - 1]]
        need = per_user - np.bincount(pairs.user_id.to_numpy() - 1, minlength=n_users)
    pairs = pairs.sort_values(["user_id", "movie_id"])
    user, movie = pairs.user_id.to_numpy(), pairs.movie_id.to_numpy()
    del pairs
    start = rng.integers(822_873_600, 1_574_000_000, n_users + 1)  # 1996-2019
    ts = start[user] + rng.integers(0, 3 * 365 * 86400, len(user))
    quality = rng.normal(0, 0.6, n_movies + 1)
    bias = rng.normal(0, 0.5, n_users + 1)
    rating = np.clip(np.round((3.5 + quality[movie] + bias[user] + rng.normal(0, 0.9, len(user))) * 2) / 2, 0.5, 5)
    ratings = pd.DataFrame({"user_id": user, "movie_id": movie, "rating": rating.astype(np.float32), "timestamp": ts.astype(np.int64)})
    genres = np.array(["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
                       "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"])
    g = [list(genres[rng.choice(len(genres), rng.integers(1, 4), replace=False)]) for _ in range(n_movies)]
    words = np.array(["The", "Last", "Night", "Love", "Man", "City", "Dark", "Story", "Return", "Girl", "King", "Dead", "Life", "War"])
    titles = [" ".join(words[rng.integers(0, len(words), rng.integers(1, 5))]) + f" {i}" for i in range(1, n_movies + 1)]
    movies = pd.DataFrame({"movie_id": np.arange(1, n_movies + 1, dtype=np.int64), "title": titles,
                           "year": pd.array(rng.integers(1920, 2020, n_movies), dtype="Int64"), "genres": g})
    return MovieLens(name=f"synthetic-25m-x{scale:g}", ratings=ratings, movies=movies, scale=(0.5, 5.0), path=None)


def bench_25m(scale: float, out: Path | None) -> None:
    t0 = time.perf_counter()
    ml = synthetic_25m(scale)
    t_gen = time.perf_counter() - t0
    r = ml.ratings
    per_user = r.user_id.value_counts()
    print(f"synthetic: {len(r):,} ratings, {len(per_user):,} users (min {per_user.min()}, median {per_user.median():.0f}, "
          f"max {per_user.max():,}), {len(ml.movies):,} movies; generated in {t_gen:.0f} s, RSS so far {peak_rss_gb():.2f} GB")
    tmp = Path(tempfile.mkdtemp(prefix="dataprep-", dir=out))
    try:
        t0 = time.perf_counter()
        meta = prepare(PrepareConfig(), tmp, ml=ml)
        t = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in tmp.iterdir()) / 1024**3
        n = sum(meta["examples"].values())
        print(f"prepare: {meta['examples']} = {n:,} examples in {t:.0f} s ({t / 60:.1f} min, {n / t:,.0f} examples/s), "
              f"{size:.2f} GB of Parquet; peak RSS {peak_rss_gb():.2f} GB (goals: <= 10 min, <= 8 GB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-100k", action="store_true")
    ap.add_argument("--skip-25m", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of ML-25M's size for the synthetic run")
    ap.add_argument("--out", type=Path, default=None, help="folder for the temporary Parquet output (default: /tmp)")
    a = ap.parse_args()
    if not a.skip_100k: bench_100k()
    if not a.skip_25m: bench_25m(a.scale, a.out)
