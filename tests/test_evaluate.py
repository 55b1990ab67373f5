"""Scoring and evaluation on real data: Surprise reproduces its published ML-100K figure, the
PyTorch and Ollama paths share one distribution, prefix reuse equals full scoring on SmolLM2, and
`evaluate` writes a comparable table for baselines and language models on the same ratings."""
import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from movierec.classic import fit_classic
from movierec.core import MOVIEREC_JSON, PROJECT_ROOT, MovierecError
from movierec.evaluate import (EvaluateConfig, KnownPredictions, evaluate, metrics_table, rating_metrics, sample_targets,
                               segment_metrics)
from movierec.score import LMPredictor, distribution_from_top_logprobs, rating_distribution, score_candidates, score_prompts

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # the seed's generate-and-parse is a benchmark comparator
from score import generate_and_parse, parse_rating  # noqa: E402  (bench/score.py)

P = ["p1", "p2", "p3", "p4", "p5"]


@pytest.fixture(scope="module")
def ml100k(ml100k_dir):
    from movierec.data import load_movielens
    return load_movielens(ml100k_dir)


@pytest.fixture(scope="module")
def prepared(ml100k, tmp_path_factory):
    "ML-100K prepared with the compact template (no classic fits to wait for); few training windows, every test target."
    from movierec.prompts import PrepareConfig, prepare
    out = tmp_path_factory.mktemp("data")
    prepare(PrepareConfig(template="compact", max_per_user=1, seed=0), out, ml=ml100k)
    return out


@pytest.fixture(scope="module")
def smollm2(base_gguf):
    from movierec.model import load_base
    return load_base(base_gguf, device="cpu")


def test_surprise_reproduces_published_ml100k_svd(ml100k):
    "Surprise's documented 5-fold SVD on ML-100K: RMSE 0.934, MAE 0.737; the harness must land there too."
    from surprise import SVD, Dataset, Reader
    from surprise.model_selection import cross_validate
    data = Dataset.load_from_df(ml100k.ratings[["user_id", "movie_id", "rating"]], Reader(rating_scale=(1, 5)))
    res = cross_validate(SVD(random_state=0), data, measures=["rmse", "mae"], cv=5, verbose=False)
    assert abs(res["test_rmse"].mean() - 0.934) < 0.01, res["test_rmse"]
    assert abs(res["test_mae"].mean() - 0.737) < 0.01, res["test_mae"]


def test_baselines_learn_from_training_ratings_only(prepared):
    from movierec.prompts import load_prepared
    d = load_prepared(prepared)
    r, test = d["ratings"], d["test"]
    b = fit_classic(r)
    train = r[r.split == "train"]
    # every movie mean is the mean of its training ratings, never touched by its val/test ratings
    movies = test.movie_id.to_numpy()[:200]
    want = train.groupby("movie_id").rating.mean().reindex(movies).fillna(train.rating.mean()).to_numpy()
    assert np.allclose(b["movie_mean"].predict_pairs(np.zeros(len(movies)), movies), want)
    assert np.isclose(b["global_mean"].predict_pairs([1], [1])[0], train.rating.mean())
    # a rating that only the test split holds would move a model fitted on everything: not these
    leaked = fit_classic(r.assign(split="train"))
    t = test.head(300)
    assert not np.allclose(b["svd"].predict_pairs(t.user_id, t.movie_id), leaked["svd"].predict_pairs(t.user_id, t.movie_id))
    with pytest.raises(MovierecError, match="no training ratings"):
        fit_classic(r.assign(split="test"))


def test_ollama_top_logprobs_give_the_pytorch_distribution():
    "What Ollama returns (top-20 log-probs of the whole vocabulary) yields the distribution PyTorch computes."
    from movierec.model import rating_token_ids, smollm2_tokenizer
    tok = smollm2_tokenizer()
    ids = rating_token_ids(tok)
    torch.manual_seed(0)
    logits = torch.randn(len(tok))
    logits[ids] = torch.tensor([7.0, 8.0, 9.0, 8.5, 7.5])  # the rating tokens are among the top 20
    logprobs = torch.log_softmax(logits, -1)
    top = torch.topk(logprobs, 20)
    entries = [{"token": tok.decode([i]), "logprob": float(lp)} for lp, i in zip(top.values, top.indices.tolist())]
    assert np.allclose(distribution_from_top_logprobs(entries), rating_distribution(logits[ids].numpy()), atol=1e-6)
    # a rating token outside the top 20 gets probability 0, the others are renormalised among themselves
    dropped = [e for e in entries if e["token"] != "1"]
    d = distribution_from_top_logprobs(dropped)
    from scipy.special import softmax
    assert d[0] == 0 and np.allclose(d[1:], softmax(logits[ids[1:]].double().numpy()), atol=1e-6)
    # the Ollama client's objects work as well as dicts
    class E:
        def __init__(self, token, logprob): self.token, self.logprob = token, logprob
    assert np.allclose(distribution_from_top_logprobs([E(**e) for e in entries]), distribution_from_top_logprobs(entries))


def test_metrics_match_scipy_and_sklearn_definitions():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    t = rng.integers(1, 6, 500).astype(float)
    p = np.clip(t + rng.normal(0, 1, 500), 1, 5)
    m = rating_metrics(t, p)
    assert np.isclose(m["rmse"], np.sqrt(np.mean((t - p) ** 2))) and np.isclose(m["mae"], np.mean(np.abs(t - p)))
    assert np.isclose(m["pearson"], pearsonr(t, p)[0]) and np.isclose(m["spearman"], spearmanr(t, p)[0])
    assert np.isclose(m["auc_liked"], roc_auc_score(t >= 4, p))
    assert np.array(m["confusion"]).sum() == 500 and np.array(m["confusion"]).sum(1).tolist() == [int((t == k).sum()) for k in range(1, 6)]


@pytest.mark.slow
def test_prefix_reuse_equals_full_scoring_on_smollm2(smollm2, ml100k):
    from movierec.data import split_by_time
    from movierec.prompts import prompts_for_user
    model, tok = smollm2
    sr = split_by_time(ml100k.ratings)
    cands = prompts_for_user(ml100k, sr, 1, [50, 181, 1, 127, 100, 258, 7])
    full = score_prompts(model, tok, cands, batch_size=7, progress=False, autocast=False)
    alone = pd.concat([score_prompts(model, tok, [c], progress=False, autocast=False) for c in cands[:3]], ignore_index=True)
    reuse = score_candidates(model, tok, cands, batch_size=4, autocast=False)
    assert np.allclose(full[P].to_numpy()[:3], alone[P].to_numpy(), atol=1e-4), "left padding changes nothing"
    assert np.allclose(full[P], reuse[P], atol=1e-4) and (full.argmax == reuse.argmax).all()
    assert full.pred.nunique() > 1, "different movies, different predictions"


def test_parse_rating_reads_the_stated_rating_or_none():
    "The seed's regex (bench/score.py): `Rating Prediction: N`, a number at the start, then `N/5` anywhere."
    assert parse_rating("4/5\nReasoning: the user likes crime films") == 4.0
    assert parse_rating("Rating Prediction: 3/5") == 3.0
    assert parse_rating(" 4.5 out of 5") == 4.5
    assert parse_rating("I think the user would give it 2/5.") == 2.0
    assert parse_rating("10/10, a masterpiece") is None, "10 is not a 1"
    assert parse_rating("The user has rated 123 movies.") is None
    assert parse_rating("") is None and parse_rating(None) is None
    assert parse_rating("Rating Prediction: 7/5") is None


def test_generate_and_parse_marks_failures_nan_on_a_tiny_model():
    from movierec.model import smollm2_tokenizer, tiny_llama
    tok = smollm2_tokenizer()
    prompts = ["Movie: Toy Story. Genres: Animation, Comedy.",
               "The user liked Heat, Casino and Fargo; disliked Grease. Movie: Goodfellas (1990). Genres: Crime, Drama."]
    gen = generate_and_parse(tiny_llama(tok, seed=0), tok, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert list(gen.columns) == ["pred", "text"] and len(gen) == 2
    assert gen.pred.isna().sum() == sum(parse_rating(t) is None for t in gen.text), "failures are NaN, counted, never 3.0"


@pytest.mark.slow
def test_generate_and_parse_counts_failures_on_smollm2(smollm2, prepared):
    from movierec.prompts import load_prepared
    model, tok = smollm2
    prompts = load_prepared(prepared)["test"].prompt.head(6).tolist()
    gen = generate_and_parse(model, tok, prompts, max_new_tokens=8, batch_size=3, progress=False)
    assert len(gen) == 6 and gen.text.str.len().gt(0).all()
    for text, pred in zip(gen.text, gen.pred):
        parsed = parse_rating(text)
        assert (parsed is None and math.isnan(pred)) or parsed == pred, (text, pred)


def _check_schema(m: dict, n: int):
    assert m["split"] == "test" and m["sample"] == n and m["dataset"] == "ml-100k"
    for e in m["models"]:
        assert {"model", "kind", "n", "metrics"} <= set(e)
        assert {"rmse", "mae", "pearson", "spearman", "auc_liked", "within_0_5", "within_1_0", "parse_failures", "n",
                "confusion"} <= set(e["metrics"])
        assert e["n"] + e["metrics"]["parse_failures"] == n
    ref = m["bootstrap"]["reference"]
    assert all("vs_best_classic" in e for e in m["models"] if e["model"] != ref), "every row but the reference has its interval"
    assert {"reference", "rows"} <= set(m["segments"]) and m["segments"]["rows"]


@pytest.mark.slow
def test_evaluate_zero_shot_smollm2_and_a_served_model(smollm2, prepared, tmp_path):
    from movierec.prompts import load_prepared
    model, tok = smollm2
    out = tmp_path / "eval"
    cfg = EvaluateConfig(eval_sample=40, seed=1)
    data = load_prepared(prepared)
    classic = list(fit_classic(data["ratings"], seed=cfg.seed).values())
    # a served model's predictions, made elsewhere for the same sampled ratings (given in another order), one failure
    targets = sample_targets(data["test"], cfg.eval_sample, cfg.seed)
    served = targets[["user_id", "movie_id"]].assign(pred=np.linspace(1.5, 4.5, len(targets)))
    served.loc[3, "pred"] = np.nan
    predictors = [*classic, LMPredictor(model, tok, "zero_shot", progress=False),
                  KnownPredictions("lora_ollama", "ollama", served.sample(frac=1, random_state=0))]
    res = evaluate(cfg, prepared, out, predictors, progress=False)
    assert [e["model"] for e in res["models"]] == [*(p.name for p in classic), "zero_shot", "lora_ollama"]
    on_disk = json.loads((out / "metrics.json").read_text())
    _check_schema(on_disk, 40)
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 40 and preds.zero_shot.between(1, 5).all() and preds.zero_shot.nunique() > 1
    # the predictions are SmolLM2's for these very prompts (all 40 scored again: the same batches, so the same
    # padding, which moves bf16 results where core.use_bf16 turns autocast on)
    test = data["test"].set_index(["user_id", "movie_id"])
    again = score_prompts(model, tok, test.loc[list(zip(preds.user_id, preds.movie_id))].prompt.tolist(), progress=False)
    assert np.allclose(again.pred.head(4), preds.zero_shot.head(4), atol=1e-4)
    # the served model joins the same table, its failures counted; predictions for other ratings are refused
    row = res["models"][-1]
    assert row["model"] == "lora_ollama" and row["kind"] == "ollama" and row["metrics"]["parse_failures"] == 1 and row["n"] == 39
    assert "lora_ollama" in metrics_table(res).index
    other = served.assign(movie_id=served.movie_id + 1)
    with pytest.raises(MovierecError, match="not for the ratings"):
        evaluate(cfg, prepared, out, [KnownPredictions("wrong", "ollama", other)], progress=False)
    assert len(json.loads((out / "metrics.json").read_text())["models"]) == len(predictors), "the last evaluation's files stay"
    assert len(list((out / "plots").glob("*.png"))) == 6  # the five of PLOTS and segments.png


def test_evaluate_with_an_adapter_scores_lora_and_its_base(prepared, tmp_path):
    "An adapter: `lora` with it, `zero_shot` the same base with it switched off (tiny Llama, seconds)."
    from peft import LoraConfig, get_peft_model
    from movierec.model import TINY, load_adapter, load_base, quiet_peft, smollm2_tokenizer, tiny_llama
    from movierec.prompts import load_prepared
    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    peft = quiet_peft(get_peft_model, tiny_llama(tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    (adapter / MOVIEREC_JSON).write_text(json.dumps({"base_model": TINY}))
    cfg = EvaluateConfig(eval_sample=30)
    classic = list(fit_classic(load_prepared(prepared)["ratings"], seed=cfg.seed).values())
    lm, lt = load_adapter(adapter)
    res = evaluate(cfg, prepared, tmp_path / "eval", [*classic, LMPredictor(lm, lt, "lora", progress=False),
                                                      LMPredictor(lm, lt, "zero_shot", adapter=False, progress=False)], progress=False)
    assert [e["model"] for e in res["models"]][-3:] == ["lora", "zero_shot", "blend"]  # blend: lora and svd, by default
    preds = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    bm, bt = load_base(TINY)
    base = evaluate(cfg, prepared, tmp_path / "eval_base", [LMPredictor(bm, bt, "zero_shot", progress=False)], progress=False)
    base_preds = pd.read_parquet(tmp_path / "eval_base" / "predictions.parquet")
    assert np.allclose(preds.zero_shot, base_preds.zero_shot, atol=1e-5), "adapter off = the base model"
    assert not np.allclose(preds.lora, preds.zero_shot, atol=1e-4), "the adapter changes the predictions"
    assert [e["model"] for e in base["models"]][-1] == "zero_shot"


@pytest.fixture(scope="module")
def classic_models(prepared):
    from movierec.prompts import load_prepared
    return fit_classic(load_prepared(prepared)["ratings"], seed=0)


@pytest.fixture(scope="module")
def evaluated(prepared, classic_models, tmp_path_factory):
    "Every classic model on 400 test targets; bias and svd blended on 300 validation targets."
    out = tmp_path_factory.mktemp("eval_classic")
    cfg = EvaluateConfig(eval_sample=400, blend=["bias", "svd"], blend_sample=300, bootstrap_resamples=1000, seed=3)
    res = evaluate(cfg, prepared, out, list(classic_models.values()), progress=False)
    return cfg, out, res


def test_every_classic_model_has_a_row_and_an_interval_against_the_best(evaluated, classic_models):
    "Issue 13 item 3: the reference is the classic row of lowest RMSE; each other row's difference gets scipy's paired interval."
    from scipy.stats import bootstrap
    cfg, out, res = evaluated
    on_disk = json.loads((out / "metrics.json").read_text())
    _check_schema(on_disk, 400)
    rows = {e["model"]: e for e in on_disk["models"]}
    assert list(rows) == [*classic_models, "blend"] and rows["blend"]["kind"] == "blend"
    best = min(classic_models, key=lambda m: rows[m]["metrics"]["rmse"])
    assert on_disk["bootstrap"]["reference"] == best and on_disk["bootstrap"]["resamples"] == 1000
    preds = pd.read_parquet(out / "predictions.parquet")
    sq = {m: (preds[m] - preds.rating).to_numpy() ** 2 for m in rows}
    for m, e in rows.items():
        if m == best:
            continue
        v = e["vs_best_classic"]
        assert v["model"] == best and v["n"] == 400
        assert np.isclose(v["rmse_diff"], e["metrics"]["rmse"] - rows[best]["metrics"]["rmse"])
        ci = bootstrap((sq[best], sq[m]), lambda a, b, axis=-1: np.sqrt(b.mean(axis)) - np.sqrt(a.mean(axis)), paired=True,
                       vectorized=True, n_resamples=1000, method="percentile", rng=np.random.default_rng(cfg.seed)).confidence_interval
        assert np.allclose(v["ci95"], [ci.low, ci.high]), (m, v["ci95"], ci)
    assert rows["global_mean"]["vs_best_classic"]["ci95"][0] > 0, "the global mean is detectably worse on 400 ratings"
    table = metrics_table(on_disk)
    assert table.loc[best, "vs_best_classic"] == "(best classic)" and table.loc["global_mean", "vs_best_classic"].startswith("+0.")


def test_the_blend_is_fitted_on_validation_targets_only(evaluated, prepared, classic_models):
    "The blend's weights are least squares on the sampled validation targets, never on the test ratings it is scored on."
    from sklearn.linear_model import LinearRegression
    from movierec.prompts import load_prepared
    cfg, out, res = evaluated
    val = sample_targets(load_prepared(prepared)["val"], 300, cfg.seed)
    x_val = np.c_[[classic_models[m].predict_pairs(val.user_id.to_numpy(), val.movie_id.to_numpy()) for m in ("bias", "svd")]].T
    on_val = LinearRegression().fit(x_val, val.rating)
    fit = {e["model"]: e for e in res["models"]}["blend"]["blend"]
    assert fit["models"] == ["bias", "svd"] and fit["n_fit"] == 300
    assert np.allclose(list(fit["weights"].values()), on_val.coef_) and np.isclose(fit["intercept"], on_val.intercept_)
    preds = pd.read_parquet(out / "predictions.parquet")
    assert np.allclose(preds.blend, np.clip(on_val.predict(preds[["bias", "svd"]].to_numpy()), 1, 5))
    on_test = LinearRegression().fit(preds[["bias", "svd"]].to_numpy(), preds.rating)
    assert not np.allclose(on_test.coef_, on_val.coef_, atol=1e-3), "the test ratings would have given other weights"
    assert not set(zip(val.user_id, val.movie_id)) & set(zip(preds.user_id, preds.movie_id))


def test_segments_by_history_popularity_and_genre(evaluated, prepared):
    "Issue 13 item 7: RMSE per bin with its interval, and the difference to the best classic model with its paired interval."
    from movierec.prompts import load_prepared
    cfg, out, res = evaluated
    preds = pd.read_parquet(out / "predictions.parquet")
    r = load_prepared(prepared)["ratings"]
    assert (preds.movie_train_ratings == preds.movie_id.map(r[r.split == "train"].movie_id.value_counts()).fillna(0)).all()
    seg = pd.DataFrame(json.loads((out / "metrics.json").read_text())["segments"]["rows"])
    ref = res["segments"]["reference"]
    for s in ("history", "popularity"):
        assert seg[(seg.segment == s) & (seg.model == "svd")].n.sum() == 400, "each rating in one bin"
    assert seg[(seg.segment == "genre") & (seg.model == "svd")].n.sum() == preds.genres.map(len).sum()
    row = seg[(seg.segment == "popularity") & (seg.bin == "10-49") & (seg.model == "global_mean")].iloc[0]
    at = preds.movie_train_ratings.between(10, 49)
    assert row.n == at.sum() > 30
    assert np.isclose(row.rmse, np.sqrt(((preds.global_mean - preds.rating)[at] ** 2).mean()))
    assert np.isclose(row.rmse_diff, row.rmse - np.sqrt(((preds[ref] - preds.rating)[at] ** 2).mean()))
    assert row.rmse_ci95[0] <= row.rmse <= row.rmse_ci95[1] and row.ci95[0] <= row.rmse_diff <= row.ci95[1]
    again = segment_metrics(preds, ["global_mean", ref], ref, cfg.bootstrap_resamples, cfg.seed)
    assert np.allclose(again[again.model == "global_mean"].rmse_diff, seg[seg.model == "global_mean"].rmse_diff)
    assert (out / "plots" / "segments.png").stat().st_size > 1000
