"""Two-stage recommendation: retrieval, re-ranking, reasons, and the ranking metrics against hand-checked toys.
The language-model tests use a random tiny Llama (mechanics) or SmolLM2 (marked slow; run under the CPU lock)."""
import numpy as np
import pandas as pd
import pytest

from movierec.data import MovieLens, load_movielens
from movierec.explain import MIN_BOTH, format_reasons
from movierec.prompts import PrepareConfig, prepare
from movierec.recommend import (RANKING_METRICS, RecommendConfig, _rankings, coverage, per_user_metrics, prepared_dataset,
                                ranking_metrics, recommend, rerank)
from movierec.retrieve import fit_retrievers


# ---------------------------------------------------------------- metrics, by hand
def test_metrics_match_a_hand_computed_toy():
    # user 1: relevant {b, d} at ranks 2 and 4; user 2: relevant {c} at rank 11 (outside the top 10, inside the top 20)
    got = per_user_metrics({1: ["a", "b", "c", "d", "e"], 2: [f"x{i}" for i in range(10)] + ["c"]}, {1: {"b", "d"}, 2: {"c"}})
    got = got.set_index("user_id")
    ndcg1 = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))  # 1.0616 / 1.6309 = 0.6509
    assert got.loc[1, "hr@10"] == 1 and got.loc[1, "ndcg@10"] == pytest.approx(ndcg1, abs=1e-9) == pytest.approx(0.6509, abs=1e-4)
    assert got.loc[1, "recall@20"] == 1 and got.loc[1, "mrr"] == pytest.approx(0.5)
    assert got.loc[2, "hr@10"] == 0 and got.loc[2, "ndcg@10"] == 0
    assert got.loc[2, "recall@20"] == 1 and got.loc[2, "mrr"] == pytest.approx(1 / 11)
    # a relevant movie nowhere in the ranking: every metric 0
    none = per_user_metrics({3: ["a", "b"]}, {3: {"z"}}).iloc[0]
    assert none[list(RANKING_METRICS)].tolist() == [0, 0, 0, 0]
    assert coverage({1: list("abc"), 2: list("cb")}, 8, k=2) == pytest.approx(3 / 8)  # a, b from user 1's top 2; c, b from user 2's


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """Three users, twelve movies, ten ratings each (7 train, 1 validation, 2 test, by time):
    u1 rated 1-7, then 8 (val), then 9 (5 stars) and 10 (2 stars) in the test period;
    u2 rated 1-6 and 9, then 10 (val), then 11 and 12 (4 stars each);
    u3 rated 2-8, then 11 (val), then 12 (1 star) and 1 (5 stars)."""
    seqs = {1: ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [3] * 8 + [5, 2]),
            2: ([1, 2, 3, 4, 5, 6, 9, 10, 11, 12], [3] * 8 + [4, 4]),
            3: ([2, 3, 4, 5, 6, 7, 8, 11, 12, 1], [3] * 8 + [1, 5])}
    ratings = pd.DataFrame([(u, m, float(r), 1000 * u + t) for u, (ms, rs) in seqs.items() for t, (m, r) in enumerate(zip(ms, rs))],
                           columns=["user_id", "movie_id", "rating", "timestamp"]).astype({"rating": "float32"})
    movies = pd.DataFrame({"movie_id": range(1, 13), "title": [f"Movie {i}" for i in range(1, 13)],
                           "year": pd.array([1990 + i for i in range(12)], dtype="Int64"), "genres": [["Drama"]] * 12})
    out = tmp_path_factory.mktemp("toy")
    prepare(PrepareConfig(template="compact", val_frac=0.1, test_frac=0.2, min_ratings=5, min_history=0, seed=0), out,
            ml=MovieLens("toy", ratings, movies, (1.0, 5.0)))
    return out


def test_the_toy_split_is_the_one_computed_by_hand(toy_dir):
    _, ratings, _ = prepared_dataset(toy_dir)
    test = ratings[ratings.split == "test"].groupby("user_id").movie_id.agg(sorted).to_dict()
    assert test == {1: [9, 10], 2: [11, 12], 3: [1, 12]}
    assert ratings[ratings.split == "val"].set_index("user_id").movie_id.to_dict() == {1: 8, 2: 10, 3: 11}


def test_full_catalogue_metrics_of_popularity_by_hand(toy_dir):
    """Watched counts before the test period: movies 2-6: 3; 1, 7, 8: 2; 9, 10, 11: 1; 12: 0.
    u1's unseen ranking is 9, 10, 11, 12 and 9 is relevant (rank 1); u3's is 1, 9, 10, 12 with 1 relevant (rank 1);
    u2's is 7, 8, 11, 12 with 11 and 12 relevant (ranks 3 and 4): NDCG@10 (1/log2 4 + 1/log2 5) / (1 + 1/log2 3)
    = 0.9307 / 1.6309 = 0.5707, MRR 1/3. The top 10s cover 9, 10, 11, 12, 7, 8 and 1: 7 of 12 movies."""
    cfg = RecommendConfig(retrievers=["popularity"], rerank_retrievers=[], ranking_users=10, sampled_users=0, cold_start_users=0)
    rk = ranking_metrics(cfg, toy_dir, progress=False, resamples=200)
    assert rk["users"] == 3 and rk["relevant_per_user"] == pytest.approx(4 / 3)
    row = rk["models"][0]
    ndcg2 = (1 / np.log2(4) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert ndcg2 == pytest.approx(0.5707, abs=1e-4)
    assert row["hr@10"] == 1 and row["recall@20"] == 1
    assert row["ndcg@10"] == pytest.approx((2 + ndcg2) / 3) and row["mrr"] == pytest.approx((2 + 1 / 3) / 3)
    assert row["coverage"] == pytest.approx(7 / 12)
    per_user = rk["per_user"].set_index("user_id")
    assert per_user.loc[2, "ndcg@10"] == pytest.approx(ndcg2) and per_user.loc[2, "mrr"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- retrieval on ML-100K
@pytest.fixture(scope="module")
def ml100k_prepared(ml100k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml100k")
    prepare(PrepareConfig(template="compact", seed=0, max_per_user=2), out, ml=load_movielens(ml100k_dir))
    return out


def test_retrievers_beat_popularity_on_the_full_catalogue(ml100k_prepared):
    "Every personalised retriever ranks the test period's liked movies better than popularity, on all 829 users with a liked test movie."
    cfg = RecommendConfig(ranking_users=1000, sampled_users=0, cold_start_users=0, rerank_retrievers=[], seed=0)
    rk = ranking_metrics(cfg, ml100k_prepared, progress=False, resamples=500)
    rows = {r["model"]: r for r in rk["models"]}
    assert list(rows) == ["popularity", "itemknn", "als", "bpr"] and rk["users"] == 829
    for m in ("itemknn", "als", "bpr"):
        assert rows[m]["vs"]["popularity"]["ndcg@10"]["ci95"][0] > 0, (m, rows[m]["vs"]["popularity"]["ndcg@10"])
        assert rows[m]["coverage"] > 2 * rows["popularity"]["coverage"]
    assert 0.05 < rows["popularity"]["ndcg@10"] < rows["itemknn"]["ndcg@10"] < 0.3


def test_recommendations_are_unseen_and_new_users_fold_in(ml100k_prepared):
    _, ratings, _ = prepared_dataset(ml100k_prepared)
    for r in ("popularity", "itemknn", "als", "bpr"):
        top = recommend(RecommendConfig(retriever=r, top_k=10), ml100k_prepared, user_id=7, explain=False)
        assert len(top) == 10 and not set(top.movie_id) & set(ratings.movie_id[ratings.user_id == 7])
        assert top.retriever_rank.tolist() == list(range(1, 11))
    liked = recommend(RecommendConfig(retriever="itemknn", top_k=10), ml100k_prepared, likes=["Star Wars", "Return of the Jedi"])
    assert not {50, 181} & set(liked.movie_id)          # Star Wars and Return of the Jedi are ids 50 and 181
    assert "Empire Strikes Back, The" in set(liked.title)  # what watchers of both also watched
    assert all(s["rating"] is None for row in liked.similar_liked for s in row)  # titles given as liked carry no rating to quote
    from movierec.core import MovierecError
    with pytest.raises(MovierecError, match="cannot take a new user"):
        recommend(RecommendConfig(retriever="bpr"), ml100k_prepared, likes=["Star Wars"])


# ---------------------------------------------------------------- reasons
def test_reasons_are_facts_of_the_data(ml100k_prepared):
    ml, ratings, _ = prepared_dataset(ml100k_prepared)
    top = recommend(RecommendConfig(top_k=10, reasons=3), ml100k_prepared, user_id=42, before_test=True)
    known = ratings[(ratings.user_id == 42) & (ratings.split != "test")]
    liked = known[known.rating >= 4].set_index("movie_id").rating
    hist = ratings[ratings.split != "test"]
    viewers = hist.groupby("movie_id").user_id.agg(set)
    genres = ml.movies.set_index("movie_id").genres
    assert top.similar_liked.map(len).gt(0).all()
    for rec in top.to_dict("records"):
        for s in rec["similar_liked"]:
            assert liked[s["movie_id"]] == s["rating"]          # a movie the user rated 4+ before the test period, with that rating
            both = viewers[rec["movie_id"]] & viewers[s["movie_id"]]
            assert s["watched_both"] == len(both) >= MIN_BOTH
            cos = len(both) / np.sqrt(len(viewers[rec["movie_id"]]) * len(viewers[s["movie_id"]]))
            assert s["similarity"] == pytest.approx(cos, abs=1e-3)
        sims = [s["similarity"] for s in rec["similar_liked"]]
        assert sims == sorted(sims, reverse=True)
        for g in rec["shared_genres"]:
            assert g["genre"] in genres[rec["movie_id"]] and g["of"] == len(liked)
            assert g["liked"] == sum(g["genre"] in genres[m] for m in liked.index)
    text = format_reasons(top)
    assert text.count("\n 2. ") == 1 and "itemknn rank 1 of" in text and "users watched both" in text


# ---------------------------------------------------------------- re-ranking
def test_rerank_permutes_only_the_top_n():
    ranking = np.array([10, 11, 12, 13, 14])
    assert rerank(ranking, pd.Series({10: 0.1, 11: 0.9, 12: 0.5}), 3).tolist() == [11, 12, 10, 13, 14]
    assert rerank(ranking, pd.Series(dtype=float), 0).tolist() == ranking.tolist()


def test_fused_reranking_by_hand():
    "Reciprocal-rank fusion (k = 60) of the retriever's order and the model's, worked out by hand."
    ranking = np.array([10, 11, 12, 13])
    score = pd.Series({10: 0.2, 11: 0.1, 12: 0.9})  # the model's order: 12, 10, 11
    # 10: 1/61 + 1/62 = 0.032522; 11: 1/62 + 1/63 = 0.032002; 12: 1/63 + 1/61 = 0.032266
    assert rerank(ranking, score, 3, fuse=True).tolist() == [10, 12, 11, 13]
    assert rerank(ranking, score, 3).tolist() == [12, 10, 11, 13]


def test_an_oracle_reranker_lifts_ndcg_and_keeps_each_list_a_ranking(ml100k_prepared):
    "Re-ranking by an oracle (1 for a liked test movie) raises NDCG@10 above the retriever's, and each list is the same movies."
    ml, ratings, _ = prepared_dataset(ml100k_prepared)
    cfg = RecommendConfig(retrievers=["itemknn"], rerank_retrievers=["itemknn"], rerank_n=50)
    users = np.array([1, 13, 42, 92, 200])
    liked = ratings[(ratings.split == "test") & (ratings.rating >= 4)].groupby("user_id").movie_id.agg(set)
    w, fitted = fit_retrievers(ratings[ratings.split != "test"], ml.movies.movie_id, ["itemknn"], cfg.neighbours, cfg.factors, 0)
    oracle = lambda u, cands: pd.DataFrame({"pred": [float(m in liked[u]) for m in cands],
                                            "p_liked": [float(m in liked[u]) for m in cands]}, index=cands)
    rankings, seconds = _rankings(cfg, fitted, w, w.rows(users), w.user_index(users), users, "oracle", oracle, progress=False)
    assert set(rankings) == {"itemknn", "itemknn+oracle", "itemknn+oracle_liked", "itemknn+oracle_fused"} and seconds["candidates"] == 5 * 50
    for u in users:
        base, top = rankings["itemknn"][u], rankings["itemknn+oracle"][u]
        assert set(base[:50]) == set(top[:50]) and list(base[50:]) == list(top[50:]) and len(base) == len(top)
    rel = {u: liked[u] for u in users}
    before, after = per_user_metrics(rankings["itemknn"], rel), per_user_metrics(rankings["itemknn+oracle"], rel)
    assert (after["ndcg@10"] >= before["ndcg@10"]).all() and after["ndcg@10"].mean() > before["ndcg@10"].mean()


def test_ranking_metrics_with_a_model_gives_every_table(ml100k_prepared):
    from movierec.core import use_bf16
    from movierec.model import smollm2_tokenizer, tiny_llama
    import torch
    from peft import LoraConfig, get_peft_model
    tok = smollm2_tokenizer()
    cfg = RecommendConfig(ranking_users=12, rerank_n=8, sampled_users=3, ranking_negatives=9, cold_start_users=3, seed=0)
    model = get_peft_model(tiny_llama(tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rk = ranking_metrics(cfg, ml100k_prepared, model, tok, name="lm", progress=False, resamples=200)
    # re-ranking ran on its own merged bf16 copy (on a bf16 CPU): the caller's model, which scores the rating rows, is as it was
    assert any("lora_A" in n for n, _ in model.named_parameters()) and {p.dtype for p in model.parameters()} == {torch.float32}
    full = [r["model"] for r in rk["models"]]
    assert full == ["popularity", "itemknn", "als", "bpr", "itemknn+lm", "itemknn+lm_liked", "itemknn+lm_fused"]
    assert [r["model"] for r in rk["cold_start"]["models"]] == ["popularity", "itemknn", "als", "itemknn+lm", "itemknn+lm_liked", "itemknn+lm_fused"]
    assert {r["model"] for r in rk["sampled"]["models"]} == {"popularity", "itemknn", "als", "bpr", "lm", "lm_liked"}
    assert rk["seconds"]["candidates_per_user"] == 8 and rk["seconds"]["rerank_per_user"] > 0
    assert rk["rerank_bf16"] == use_bf16("cpu"), "re-ranking takes this CPU's bf16 kernels where it has them (score_bf16 auto)"
    lm = {r["model"]: r for r in rk["models"]}["itemknn+lm"]
    assert set(lm["vs"]) == {"itemknn", "popularity"} and len(lm["vs"]["itemknn"]["ndcg@10"]["ci95"]) == 2
    per_user = rk["per_user"]
    assert not per_user.duplicated(["model", "user_id"]).any() and len(per_user) == 12 * 7 + 3 * 6 + 3 * 6
    assert {"sampled/lm", "cold_start/itemknn+lm"} <= set(per_user.model)


@pytest.mark.slow
def test_smollm2_reranks_50_candidates_with_reasons(ml100k_prepared):
    "SmolLM2 re-ranks a user's 50 candidates (run under the CPU lock); the predictions join the reasons."
    from movierec.model import load_base
    model, tok = load_base(None)
    top = recommend(RecommendConfig(top_k=10, rerank_n=50, rerank_by="expected"), ml100k_prepared, model, tok, user_id=42)
    assert len(top) == 10 and top.pred.is_monotonic_decreasing and top.retriever_rank.max() <= 50
    assert np.allclose(top[["p1", "p2", "p3", "p4", "p5"]].sum(axis=1), 1)
    assert "predicted" in format_reasons(top) and "P(5)" in format_reasons(top)
