"""How deep should the language model re-rank the retriever's list? Run by hand, under the CPU lock:

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/rerank_depth.py --run runs/default [--users 200] [--out FILE.json]
    # every eligible user, scored once, reported by group (the depth was chosen on users 200-400):
    ... --users 829 --candidates 10 --depths 5,10 --groups "reported=0:200,chosen-on=200:400,held-out=0:200+400:829"

The evaluation's own users (or, with --offset, the users after them in its seeded order), relevant movies and item-kNN lists (`recommend.ranking_metrics`' protocol: each user's
liked test movies among every movie they had not rated before their test period). The adapter scores each user's
top `--candidates` once; every depth N up to it re-ranks the first N of the same list with those scores, by expected
rating, P(rating >= 4) and that fused with item-kNN's order. Each row: NDCG@10, Recall@20 (ranx) and the paired
bootstrap difference against item-kNN alone, on the same users; and the re-ranking seconds per user N candidates
would cost (the measured per-candidate time times N: a candidate's tail is scored on its own after the shared prefix).
"""
import argparse
import time
from pathlib import Path

import pandas as pd

from movierec.core import RunLayout, atomic_path, write_json
from movierec.model import load_adapter
from movierec.recommend import (RecommendConfig, _history, _lm_fn, _retrieve_all, _table, _test_start, evaluation_users,
                                prepared_dataset, prompt_setting, relevant_movies, rerank)
from movierec.retrieve import fit_retrievers
from movierec.score import fast_bf16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run folder (its data/ and adapter/)")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0, help="skip the evaluation's first N users (0: its own users; 200: other users, "
                                                             "to choose a depth on without looking at the reported ones)")
    ap.add_argument("--candidates", type=int, default=50, help="the deepest re-ranking measured; every depth below reuses its scores")
    ap.add_argument("--depths", default="5,10,20,30,50")
    ap.add_argument("--fuse-weights", default="", help="also fuse with these weights of the model's reciprocal rank against "
                                                      "item-kNN's (1: the library's fused), e.g. 0.5,2: choose one on other users")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--groups", default=None, help="tables for groups of the scored users, by position in the evaluation's seeded "
                                                 "order: 'name=a:b+c:d,...' (default: one table of them all)")
    ap.add_argument("--scores", help="parquet file of the adapter's scores of each user's candidates: written after scoring, "
                                     "read instead of scoring when it exists (to try other re-rankings of the same scores)")
    ap.add_argument("--out", help="JSON file for the table(s)")
    args = ap.parse_args(argv)
    run = RunLayout(args.run)
    cfg = RecommendConfig(ranking_users=args.offset + args.users, rerank_n=args.candidates)
    ml, ratings, template = prepared_dataset(run.data)
    users = evaluation_users(ratings, cfg.ranking_users, cfg.seed)[args.offset:]
    relevant = relevant_movies(ratings, users)
    w, fitted = fit_retrievers(_history(ratings, True), ml.movies.movie_id, ["itemknn"], cfg.neighbours, cfg.factors, cfg.seed)
    lists = _retrieve_all(fitted, w, w.rows(users), w.user_index(users))["itemknn"]
    saved = Path(args.scores) if args.scores else None
    if saved and saved.exists():
        frame = pd.read_parquet(saved)
        scores = {u: g.drop(columns="user_id").set_index("movie_id") for u, g in frame.groupby("user_id")}
        missing = [u for i, u in enumerate(users.tolist()) if u not in scores or len(scores[u]) < min(args.candidates, len(lists[i]))]
        if missing: raise SystemExit(f"{saved} lacks the scores of {len(missing)} of these users (e.g. {missing[:3]}); delete it to rescore")
        per_candidate, bf16 = float(frame.attrs.get("s_per_candidate", "nan")), frame.attrs.get("bf16")
    else:
        model, tok = load_adapter(run.adapter, device="cpu")
        bf16 = fast_bf16(model, cfg.score_bf16)
        lm = _lm_fn(model, tok, ml, ratings, template, _test_start(ratings), 16, prompt_setting(run.data, ml, ratings, template),
                    score_bf16=cfg.score_bf16)
        scores, t0 = {}, time.perf_counter()
        for i, u in enumerate(users.tolist()):
            scores[u] = lm(u, lists[i][:args.candidates])
            if (i + 1) % 25 == 0: print(f"{i + 1}/{len(users)} users scored, {(time.perf_counter() - t0) / (i + 1):.2f} s/user", flush=True)
        per_candidate = (time.perf_counter() - t0) / (len(users) * args.candidates)
        if saved:
            frame = pd.concat([s.rename_axis("movie_id").reset_index().assign(user_id=u) for u, s in scores.items()], ignore_index=True)
            frame.attrs.update(s_per_candidate=per_candidate, bf16=bf16)
            with atomic_path(saved) as tmp: frame.to_parquet(tmp)
    rankings, depth = {"itemknn": dict(zip(users.tolist(), lists))}, {"itemknn": 0}
    for n in map(int, args.depths.split(",")):
        for by, col, fuse in (("expected", "pred", False), ("liked", "p_liked", False), ("fused", "p_liked", True)):
            name = f"itemknn+lora@{n}_{by}"
            rankings[name], depth[name] = {u: rerank(lists[i], scores[u][col], n, fuse=fuse) for i, u in enumerate(users.tolist())}, n
        for wt in [float(x) for x in args.fuse_weights.split(",") if x]:
            name = f"itemknn+lora@{n}_fused_w{wt:g}"
            rankings[name], depth[name] = {u: rerank(lists[i], scores[u]["p_liked"], n, fuse=True, weight=wt)
                                           for i, u in enumerate(users.tolist())}, n
    tables = {}
    for group, members in _groups(args.groups, args.offset, users).items():
        rows, _ = _table({m: {u: r[u] for u in members} for m, r in rankings.items()}, {u: relevant[u] for u in members},
                         len(ml.movies), args.resamples, cfg.seed)
        table = []
        for r in rows:
            vs = r["vs"].get("itemknn", {})
            table.append({"model": r["model"], "users": r["users"], "ndcg@10": r["ndcg@10"], "recall@20": r["recall@20"],
                          "ndcg@10 vs itemknn": vs.get("ndcg@10", {}).get("diff"), "ci95": vs.get("ndcg@10", {}).get("ci95"),
                          "recall@20 vs itemknn": vs.get("recall@20", {}).get("diff"), "recall ci95": vs.get("recall@20", {}).get("ci95"),
                          "rerank_s_per_user": round(per_candidate * depth[r["model"]], 2)})
        tables[group] = table
        print(f"\n{group}: {len(members)} users")
        with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
            print(pd.DataFrame(table).to_string(index=False))
    print(f"{per_candidate:.3f} s per candidate (prefix included), {len(users)} users, bf16 {bf16}")
    if args.out: write_json(Path(args.out), {"users": len(users), "s_per_candidate": per_candidate, "tables": tables})
    return 0


def _groups(spec: str | None, offset: int, users) -> dict:
    "{group name: its user ids}, from 'name=a:b+c:d,...' (positions in the evaluation's seeded order, offset included)."
    order = users.tolist()
    if not spec: return {"all": order}
    out = {}
    for part in spec.split(","):
        name, _, ranges = part.partition("=")
        members = []
        for r in ranges.split("+"):
            a, _, b = r.partition(":")
            lo, hi = int(a or offset) - offset, (int(b) - offset if b else len(order))
            if lo < 0 or hi > len(order) or lo >= hi:
                raise SystemExit(f"--groups {part!r}: {r!r} is not within the scored positions {offset}:{offset + len(order)}")
            members += order[lo:hi]
        out[name.strip()] = members
    return out


if __name__ == "__main__":
    raise SystemExit(main())
