"""Continual updates measured (issue 17, item 2): updated vs not updated vs retrained from scratch, on the same test ratings.

A global time cut of one dataset (ML-100K by default): run A is trained on the ratings up to T, then

- `updated`:      A's adapter continued on the ratings in (T, T2] (`movierec.update.update`: B's data and adapter);
- `not_updated`:  A's adapter as it is;
- `retrained`:    a new adapter trained from scratch, A's recipe, on the dataset cut at T2 (what rerunning the
                  pipeline on the newer dump gives: `prepare` with a global split, then `train`).

All three score the SAME sampled test ratings after T2 with the same prompts (B's test examples: histories up
to T2, classic estimates fitted on B's training ratings), with every classic model fitted on B's training
ratings as reference (`movierec.evaluate.evaluate`). Each difference is the paired bootstrap 95% interval
of the RMSE difference on those ratings (`evaluate.metric_difference`), with a verdict. Forgetting: A's own
test set (its last ratings before T) re-scored by all three. Wall time: A's training, the update (its
data and its training), the retraining (its data and its training).

Run under the CPU lock, alone (it trains three adapters):

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/update.py --out /work/exp/update

Defaults: T and T2 at the 70% and 85% quantiles of the rating times, 2,000 training examples for A and
for the retraining (the CPU default), 2,000 update examples, 1,000 test ratings. A smoke test on the tiny
random Llama: `--base-model tiny-llama --users 60 --train-examples 32 --update-examples 16 --max-steps 2
--eval-sample 40 --old-sample 20`. `--table` prints the last result (markdown) without running anything.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from movierec.classic import CLASSIC_NAMES, load_classic
from movierec.core import RunLayout, write_json
from movierec.data import MovieLens, load_movielens
from movierec.evaluate import EvaluateConfig, evaluate, metric_difference, verdict
from movierec.model import load_adapter
from movierec.prompts import PrepareConfig, prepare
from movierec.score import LMPredictor
from movierec.train import TrainConfig, train
from movierec.update import UpdateConfig, time_cut, update

MODELS = ("not_updated", "updated", "retrained")
RESULT = "update_bench.json"


def cut_times(ml: MovieLens, cut: str) -> tuple[int, int]:
    "T and T2: two quantiles of the rating times (`0.7,0.85`) or two times (Unix seconds, ISO dates) as `--cut` says."
    a, b = cut.split(",")
    if float(a) < 1 and float(b) < 1: return tuple(int(x) for x in np.quantile(ml.ratings.timestamp, [float(a), float(b)]))
    cfg = UpdateConfig(since=a, until=b)
    return cfg.since, cfg.until


def timed(f, *a, **kw):
    t0 = time.perf_counter()
    out = f(*a, **kw)
    return out, round(time.perf_counter() - t0, 1)


def score(data_dir, out_dir, adapters: dict, eval_sample: int, seed: int, classic: bool) -> dict:
    "Every adapter (and the data's classic models) on the same sampled test ratings of `data_dir`; metrics.json's content."
    preds = [LMPredictor(*load_adapter(path, device="cpu"), name=name, progress=False) for name, path in adapters.items()]
    if classic: preds = [m for n, m in load_classic(data_dir).items() if n in CLASSIC_NAMES] + preds
    cfg = EvaluateConfig(eval_sample=eval_sample, blend=[], seed=seed, device="cpu", zero_shot=False)
    return evaluate(cfg, data_dir, out_dir, preds, progress=False)


def differences(out_dir, pairs, resamples: int, seed: int) -> list[dict]:
    "RMSE of b minus a on the scored ratings, with its paired bootstrap 95% interval and a verdict, for each (a, b)."
    p = pd.read_parquet(RunLayout(out_dir).predictions)
    rows = []
    for a, b in pairs:
        d = metric_difference(p.rating, p[a], p[b], "rmse", resamples, seed)
        rows.append({"a": a, "b": b, "n": d["n"], "rmse_a": d["a"], "rmse_b": d["b"], "diff": d["diff"], "ci95": d["ci95"],
                     "verdict": verdict(d["ci95"], "rmse")})
    return rows


def markdown(res: dict) -> str:
    "The result as markdown tables."
    lines = [f"Dataset {res['dataset']} ({res['users']} users), global time cut: A up to T={res['T']}, update (T, T2={res['T2']}], "
             f"test after T2. Base model {res['base_model'] or 'SmolLM2-135M-Instruct'}.", "",
             f"New test ratings (after T2), n={res['new_test']['sample']}:", "", "| model | RMSE | wall s |", "| --- | --- | --- |"]
    rmse = {e["model"]: e["metrics"]["rmse"] for e in res["new_test"]["models"]}
    for m, v in rmse.items(): lines.append(f"| {m} | {v:.4f} | {res['seconds'].get(m, '')} |")
    lines += ["", "| B - A (RMSE) | n | diff [95% CI] | verdict for B |", "| --- | --- | --- | --- |"]
    for t in ("new_diffs", "old_diffs"):
        for d in res[t]:
            lines.append(f"| {'new' if t == 'new_diffs' else 'old'} test: {d['b']} - {d['a']} | {d['n']} | "
                         f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {d['verdict']} |")
    old = {e["model"]: e["metrics"]["rmse"] for e in res["old_test"]["models"]}
    lines += ["", f"A's old test set (its last ratings before T), n={res['old_test']['sample']}: "
              + ", ".join(f"{m} {v:.4f}" for m, v in old.items())]
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--cut", default="0.7,0.85", help="T,T2: quantiles of the rating times, or times (Unix seconds / ISO dates)")
    ap.add_argument("--users", type=int, help="only the first N users (smoke tests)")
    ap.add_argument("--base-model", default=None)
    ap.add_argument("--train-examples", type=int, default=2000, help="A's and the retraining's training examples")
    ap.add_argument("--update-examples", type=int, default=2000)
    ap.add_argument("--objective", default="expected_mse", help="A's and the retraining's objective (the update keeps A's); the default run's")
    ap.add_argument("--replay", type=float, default=0.0)
    ap.add_argument("--update-learning-rate", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=-1, help="every training's step limit (-1: one epoch)")
    ap.add_argument("--eval-sample", type=int, default=1000, help="test ratings after T2 scored by every model")
    ap.add_argument("--old-sample", type=int, default=1000, help="A's test ratings re-scored (forgetting)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="print the last result and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown(json.loads((args.out / RESULT).read_text()))); return None
    ml = load_movielens(args.dataset)
    if args.users: ml = MovieLens(ml.name, ml.ratings[ml.ratings.user_id <= args.users].reset_index(drop=True), ml.movies, ml.scale, ml.path)
    T, T2 = cut_times(ml, args.cut)
    a, b, r = (RunLayout(args.out / n) for n in ("A", "B", "R"))
    pcfg = PrepareConfig(dataset=str(ml.path), split="global", seed=args.seed)
    tcfg = TrainConfig(base_model=args.base_model, train_examples=args.train_examples, objective=args.objective,
                       max_steps=args.max_steps, device="cpu", seed=args.seed)
    seconds = {}
    # A: the ratings up to T
    _, seconds["a_prepare"] = timed(prepare, pcfg, a.data, ml=time_cut(ml, until=T))
    _, seconds["a_train"] = timed(train, a.data, a.adapter, tcfg, progress=False)
    # B: A updated with (T, T2]
    ucfg = UpdateConfig(since=T, until=T2, update_examples=args.update_examples, replay=args.replay,
                        update_learning_rate=args.update_learning_rate, update_max_steps=args.max_steps, device="cpu", seed=args.seed)
    rec, seconds["updated"] = timed(update, a.root, b.root, ucfg, ratings=ml, progress=False)
    # R: from scratch on every rating up to T2
    _, seconds["r_prepare"] = timed(prepare, pcfg, r.data, ml=time_cut(ml, until=T2))
    _, seconds["r_train"] = timed(train, r.data, r.adapter, tcfg, progress=False)
    seconds.update(not_updated=round(seconds["a_prepare"] + seconds["a_train"], 1), retrained=round(seconds["r_prepare"] + seconds["r_train"], 1))
    adapters = {"not_updated": a.adapter, "updated": b.adapter, "retrained": r.adapter}
    new_test = score(b.data, args.out / "eval_new", adapters, args.eval_sample, args.seed, classic=True)
    old_test = score(a.data, args.out / "eval_old", adapters, args.old_sample, args.seed, classic=False)
    pairs = [("not_updated", "updated"), ("retrained", "updated"), ("not_updated", "retrained")]
    res = {"dataset": ml.name, "users": int(ml.ratings.user_id.nunique()), "T": T, "T2": T2, "base_model": args.base_model,
           "args": {k: str(v) for k, v in vars(args).items()}, "update": rec, "seconds": seconds,
           "new_test": new_test, "old_test": old_test,
           "new_diffs": differences(args.out / "eval_new", pairs, args.resamples, args.seed),
           "old_diffs": differences(args.out / "eval_old", pairs[:2], args.resamples, args.seed)}
    write_json(args.out / RESULT, res)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
