"""Does the language model's re-ranking help new users? The cold-start table on users the evaluation did not report.
Run by hand, under the CPU lock:

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/cold_start.py --data runs/default/data --adapter runs/default/adapter \
        [--offset 200] [--users 629] [--out FILE.json]

`recommend.ranking_metrics`' cold-start protocol with `RecommendConfig`'s defaults: each user cut to their first
`cold_start_ratings` ratings and folded into retrievers refitted without them (50 users at a time), the model re-ranking
item-kNN's top `rerank_n` by expected rating, P(rating >= 4) and both fused with item-kNN's order. The users are those
after the evaluation's first `--offset` in its seeded order (an evaluation with `cold_start_users: 200` reported the
first 200), so a result seen there gets a second, disjoint sample. Prints NDCG@10 and Recall@20 per row, each against
item-kNN and popularity, paired on the same users (bootstrap 95% intervals).
"""
import argparse
import time
from pathlib import Path

from movierec.core import write_json
from movierec.evaluate import format_interval
from movierec.model import load_adapter
from movierec.recommend import (RecommendConfig, _cold_start_rankings, _history, _table, _test_start, evaluation_users,
                                prepared_dataset, relevant_movies)
from movierec.retrieve import fit_retrievers


def _interval(row: dict, against: str, metric: str) -> str:
    d = row.get("vs", {}).get(against, {}).get(metric)
    return format_interval(d["diff"], d["ci95"], digits=4) if d else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a folder written by `movierec data`")
    ap.add_argument("--adapter", required=True, help="an adapter written by `movierec train`")
    ap.add_argument("--offset", type=int, default=200, help="skip the evaluation's first N users (the ones it reported)")
    ap.add_argument("--users", type=int, default=None, help="at most this many users after them (default: all the rest)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--out", help="JSON file for the table")
    args = ap.parse_args(argv)
    data = Path(args.data)
    ml, ratings, template = prepared_dataset(data)
    cfg = RecommendConfig()
    every = evaluation_users(ratings, 10**9, cfg.seed)
    users = every[args.offset:][:args.users]
    if not len(users): raise SystemExit(f"{data} has {len(every)} users with a liked test movie: none after --offset {args.offset}")
    names = list(dict.fromkeys([*cfg.retrievers, *cfg.rerank_retrievers]))
    _, fitted = fit_retrievers(_history(ratings, True), ml.movies.movie_id, names, cfg.neighbours, cfg.factors, cfg.seed)
    new = [r for r in names if fitted[r].new_users]                      # the retrievers that can fold in a new user
    model, tok = load_adapter(args.adapter, device="cpu")
    print(f"cold start: users {args.offset}-{args.offset + len(users)} of {len(every)} in the evaluation's order, first "
          f"{cfg.cold_start_ratings} ratings each; retrievers {new}; the adapter re-ranks item-kNN's top {cfg.rerank_n}", flush=True)
    t0 = time.perf_counter()
    rankings = _cold_start_rankings(cfg, data, ml, ratings, template, users, new, _test_start(ratings), model, tok, "lora", 16, True)
    seconds = time.perf_counter() - t0
    relevant = relevant_movies(ratings, users)
    rows, _ = _table(rankings, relevant, len(ml.movies), args.resamples, cfg.seed)
    print(f"{len(users)} users in {seconds:.0f} s\n")
    print("| model | NDCG@10 | NDCG@10 vs item-kNN | NDCG@10 vs popularity | Recall@20 | Recall@20 vs item-kNN |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['ndcg@10']:.4f} | {_interval(r, 'itemknn', 'ndcg@10')} | {_interval(r, 'popularity', 'ndcg@10')} "
              f"| {r['recall@20']:.4f} | {_interval(r, 'itemknn', 'recall@20')} |")
    if args.out:
        write_json(args.out, {"offset": args.offset, "users": len(users), "seconds": round(seconds, 1), "adapter": str(args.adapter),
                              "protocol": f"first {cfg.cold_start_ratings} ratings, item-kNN's top {cfg.rerank_n} re-ranked", "models": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
