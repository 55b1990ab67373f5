"""A run you can look at (issue 16, item 3): `report.html` of a run folder and `movierec compare A B --html FILE`,
self-contained pages (plots embedded as base64 data URIs, nothing fetched). One run folder with made-up metrics,
real PNG plots and MovieLens-100K prepared as its data/ (for the example recommendations)."""
import base64
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from movierec.core import MovierecError, RunLayout, write_json
from movierec.data import load_movielens
from movierec.params import Params
from movierec.prompts import PrepareConfig, prepare
from movierec.recommend import evaluation_users, prepared_dataset
from movierec.report import REPORT_HTML, compare_runs, comparison_html, write_report_html

MOVIEREC = str(Path(sys.executable).parent / "movierec")
MODELS = ["global_mean", "svd", "lora", "blend"]
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def save_png(path: Path, ys) -> Path:
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot(range(len(ys)), ys)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=40)
    return path


def metrics() -> dict:
    entry = lambda m, kind, rmse, **kw: {"model": m, "kind": kind, "n": 30, "metrics": {"rmse": rmse, "mae": rmse * 0.8, "pearson": None
                                          if m == "global_mean" else 0.3, "parse_failures": 0}, **kw}
    return {"dataset": "ml-100k", "split": "test", "sample": 30, "seed": 0,
            "models": [entry("global_mean", "baseline", 1.1), entry("svd", "baseline", 0.98),
                       entry("lora", "llm", 0.95, vs_best_classic={"model": "svd", "rmse_diff": -0.03, "ci95": [-0.081, 0.017]}),
                       entry("blend", "blend", 0.93, vs_best_classic={"model": "svd", "rmse_diff": -0.05, "ci95": [-0.09, -0.012]},
                             blend={"weights": {"lora": 0.45, "svd": 0.62}, "intercept": -0.2, "n_fit": 40})],
            "bootstrap": {"method": "paired bootstrap", "resamples": 2000, "confidence": 0.95, "seed": 0, "reference": "svd"},
            "ranking": {"protocol": "each user's liked test movies ranked among every movie they had not rated", "users": 3,
                        "models": [{"model": "itemknn", "users": 3, "hr@10": 1 / 3, "mrr": 0.2, "coverage": 0.05,
                                    "ci95": {"hr@10": [0.0, 1.0], "mrr": [0.05, 0.4]}},
                                   {"model": "itemknn+lora", "users": 3, "hr@10": 2 / 3, "mrr": 0.3, "coverage": 0.04,
                                    "ci95": {"hr@10": [0.0, 1.0], "mrr": [0.1, 0.5]},
                                    "vs": {"itemknn": {"ndcg@10": {"diff": 0.04, "ci95": [-0.02, 0.11]}}}}]}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ml100k_dir) -> Path:
    "A finished run folder: params, stage times, metrics, two evaluation plots and the loss curve, prepared MovieLens-100K."
    run = RunLayout(tmp_path_factory.mktemp("runs") / "look")
    Params().replace(lora_rank=8, learning_rate=3e-4, seed=7).save(run.params)
    write_json(run.stages, {"01_prepare": {"status": "complete", "started": "2026-01-01T00:00:00Z", "seconds": 2.5},
                            "04_evaluate": {"status": "complete", "started": "2026-01-01T00:01:00Z", "seconds": 63.8},
                            "05_report": {"status": "running"}})
    write_json(run.metrics, metrics())
    save_png(run.plots / "calibration.png", [1, 3, 2]); save_png(run.plots / "error_by_rating.png", [2, 1, 2])
    save_png(run.adapter / "loss.png", [3, 2, 1])
    write_json(run.adapter / "train.json", {"device": "cpu", "steps": 6, "train_loss": 2.5275, "val_loss": 2.2038})
    prepare(PrepareConfig(template="compact", max_per_user=2, seed=7), run.data, ml=load_movielens(ml100k_dir))
    return run.root


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    path = write_report_html(run_dir)
    assert path == run_dir / REPORT_HTML
    return path.read_text()


def section(page: str, title: str) -> str:
    return page.split(f"<h2>{title}</h2>")[1].split("<h2>")[0]


def test_metrics_table_with_intervals(page):
    table = section(page, "Metrics").split("<h3>")[0]
    assert re.findall(r"<tr>\s*<th>(\w+)</th>", table) == MODELS  # one row per model, in metrics.json's order
    for m in ("rmse", "vs_best_classic", "mae", "pearson", "parse_failures"): assert f"<th>{m}</th>" in table
    assert "<td>-0.030 [-0.081, +0.017]</td>" in table and "<td>-0.050 [-0.090, -0.012]</td>" in table
    assert "<td>(best classic)</td>" in table and "<td>0.9500</td>" in table
    assert re.search(r"<th>global_mean</th>\s*<td>baseline</td>\s*<td>30</td>\s*<td>1.1000</td>\s*<td></td>\s*<td>0.8800</td>\s*<td>n/a</td>", table)
    assert "0.450 x lora + 0.620 x svd -0.200" in section(page, "Metrics")


def test_every_plot_embedded(page, run_dir):
    run = RunLayout(run_dir)
    pngs = [run.plots / "calibration.png", run.plots / "error_by_rating.png", run.adapter / "loss.png"]
    assert [base64.b64decode(b) for b in DATA_URI.findall(page)] == [p.read_bytes() for p in pngs]
    assert page.count("<img ") == 3
    # self-contained: nothing to fetch, no script
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "@import" not in page


def test_ranking_table(page):
    ranking = section(page, "Ranking")
    assert "every movie they had not rated" in ranking
    assert "<td>0.333 [0.000, 1.000]</td>" in ranking and "<td>0.300 [0.100, 0.500]</td>" in ranking
    assert "<td>+0.040 [-0.020, +0.110]</td>" in ranking  # the re-ranking's NDCG@10 against its retriever


def test_example_recommendations_with_reasons(page, run_dir):
    recs = section(page, "Example recommendations")
    _, ratings, _ = prepared_dataset(RunLayout(run_dir).data)
    users = evaluation_users(ratings, 3, 7).tolist()  # the ranking evaluation's first users, with the run's seed
    assert re.findall(r"<h3>User (\d+)</h3>", recs) == [str(u) for u in users]
    assert recs.count("itemknn rank 1 of ") == 3 and recs.count("<tbody>") == 3
    assert len(re.findall(r"<tr><th>\d+</th>", recs)) == 3 * 5  # five recommendations each (the report's top_k)
    assert "watched by the same users as movies you liked" in recs and "genres of movies you liked" in recs
    assert "No language model re-ranked them" in recs


def test_parameters_and_stage_times(page):
    knobs = section(page, "Parameters")
    for knob, value in [("lora_rank", "8"), ("learning_rate", "0.0003"), ("seed", "7"), ("dataset", "ml-100k"),
                        ("lora_targets", '["q_proj", "k_proj", "v_proj", "o_proj"]')]:
        assert re.search(rf"<th>{knob}</th>\s*<td>[a-z, ]+</td>\s*<td>{re.escape(value)}</td>", knobs), knob
    assert len(re.findall(r"<tr>\s*<th>", knobs)) == len(Params().flat())
    stages = section(page, "Wall time per stage")
    assert re.search(r"<th>04_evaluate</th>\s*<td>complete</td>\s*<td>2026-01-01T00:01:00Z</td>\s*<td>63.8</td>", stages)
    assert "writing this report" in stages
    assert "<td>2.5275</td>" in section(page, "Training")


def test_missing_metrics_is_refused_by_name(tmp_path):
    Params().save(RunLayout(tmp_path).params)
    with pytest.raises(MovierecError, match=r"metrics\.json does not exist.*evaluate"):
        write_report_html(tmp_path)
    assert not (tmp_path / REPORT_HTML).exists()


def small_run(root: Path, lora, lora_rank: int) -> Path:
    "A run folder with params.yaml and predictions.parquet: six test ratings, svd and lora."
    run = RunLayout(root)
    root.mkdir(parents=True)
    Params().replace(lora_rank=lora_rank).save(run.params)
    pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "movie_id": [10, 11, 10, 12, 11, 13], "timestamp": range(6),
                  "rating": [5.0, 4.0, 3.0, 2.0, 1.0, 4.0], "history_len": [5, 5, 150, 150, 150, 5], "genres": [["Drama"]] * 6,
                  "movie_train_ratings": [60, 3, 60, 60, 3, 3], "svd": [4.0, 4.0, 3.0, 3.0, 2.0, 3.0], "lora": lora}
                 ).to_parquet(run.predictions)
    return root


def test_comparison_page(tmp_path):
    a = small_run(tmp_path / "A", [4.0, 3.0, 4.0, 3.0, 2.0, 3.0], 16)  # lora off by 1 everywhere
    b = small_run(tmp_path / "B", [4.5, 4.0, 3.5, 2.0, 1.5, 4.0], 8)   # off by at most 0.5
    page = comparison_html(compare_runs(a, b, resamples=500), tmp_path / "cmp.html").read_text()
    metrics = section(page, "Metrics")
    assert re.findall(r"<th>([^<]+)</th>", metrics) == ["model", "metric", "n", "A", "B", "B - A [95% interval]", "verdict"]
    assert re.search(r"<td>lora</td>\s*<td>mae</td>\s*<td>6</td>\s*<td>1.0000</td>\s*<td>0.2500</td>\s*<td>-0.7500 \[[^]]+\]</td>\s*"
                     r'<td class="better">better</td>', metrics)
    assert re.search(r"<td>svd</td>\s*<td>rmse</td>.*?<td>no detectable difference</td>", metrics, re.S)
    assert "<th>verdict</th>" in section(page, "RMSE by segment")
    assert re.search(r"<td>lora_rank</td>\s*<td>16</td>\s*<td>8</td>", section(page, "Parameters that differ"))
    assert len(DATA_URI.findall(page)) == 1 and base64.b64decode(DATA_URI.findall(page)[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_writes_the_page(tmp_path):
    a = small_run(tmp_path / "A", [4.0, 3.0, 4.0, 3.0, 2.0, 3.0], 16)
    b = small_run(tmp_path / "B", [4.5, 4.0, 3.5, 2.0, 1.5, 4.0], 8)
    r = subprocess.run([MOVIEREC, "compare", a, b, "--plot", tmp_path / "cmp.png", "--html", tmp_path / "out" / "cmp.html"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"page: {tmp_path / 'out' / 'cmp.html'}" in r.stdout
    page = (tmp_path / "out" / "cmp.html").read_text()
    assert "<th>verdict</th>" in page and '<td class="better">better</td>' in page and len(DATA_URI.findall(page)) == 1
