"""Ablations of the language model's recipe (issue 13) on the same sampled test ratings.

One configuration per call: prepare the data with its prepare knobs (cached by those knobs), train
a LoRA adapter with its train knobs, score the SAME `--eval-sample` test ratings (seeded) with the
adapter and with every classic model, and print/append one row: RMSE of each model, the paired
bootstrap 95% interval of (lora RMSE - classic RMSE), tokens per example, prepare/train/score
seconds. Everything goes through the library (`prepare`, `train`, `score.LMPredictor`,
`classic`), so a row measures what `movierec run` would do with those knobs.

Run each configuration under the CPU lock, never two at once:

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/ablations.py --name hybrid-recent \\
        --template hybrid --train-targets recent --history train --out /work/exp/h7

`--table` prints every row appended so far (markdown) instead of running anything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from movierec.classic import CLASSIC_FILE, fit_classic, load_classic
from movierec.evaluate import sample_targets
from movierec.prompts import PrepareConfig, get_template, load_prepared, prepare
from movierec.train import TrainConfig, train

CLASSIC_ROWS = ("bias", "svd", "svdpp", "knn_baseline", "knn_user")
PREPARE_KNOBS = ("template", "train_targets", "history", "split", "max_per_user", "min_history", "folds", "seed")
TRAIN_KNOBS = {"train_examples": int, "objective": str, "learning_rate": float, "epochs": float, "batch_size": int,
               "lora_rank": int, "lora_alpha": float, "val_examples": int, "eval_steps": int, "save_steps": int,
               "warmup_ratio": float, "lr_scheduler": str, "max_steps": int}


def paired_bootstrap(err_a: np.ndarray, err_b: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    "RMSE(a) - RMSE(b) on the same ratings, and its 95% percentile interval over paired resamples of the ratings."
    sa, sb = np.asarray(err_a, float) ** 2, np.asarray(err_b, float) ** 2
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(0, n_boot, 1000):  # 1,000 resamples at a time: bounded memory
        idx = rng.integers(0, len(sa), (min(1000, n_boot - i), len(sa)))
        diffs[i:i + len(idx)] = np.sqrt(sa[idx].mean(1)) - np.sqrt(sb[idx].mean(1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(np.sqrt(sa.mean()) - np.sqrt(sb.mean())), float(lo), float(hi)


def prepared(out: Path, pcfg: PrepareConfig) -> Path:
    "The prepared data of `pcfg`, under `out/data/<hash of its knobs>` (prepared once)."
    knobs = pcfg.model_dump(mode="json")
    slug = "-".join(str(knobs[k]) for k in ("template", "train_targets", "history", "split"))
    key = json.dumps([knobs, get_template(pcfg.template)], sort_keys=True)  # the template's text too: it may change
    d = out / "data" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    if not (d / "data.json").exists():
        t0 = time.perf_counter()
        prepare(pcfg, d)
        print(f"prepared {d} in {time.perf_counter() - t0:.0f} s", flush=True)
    return d


def stack_of_estimates(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray | None:
    "The reference a hybrid prompt's numbers set: least squares of the rating on the estimates quoted in the training prompts (as printed)."
    pattern = r"Estimates: (.*)$"
    def numbers(df):
        line = df.prompt.str.extract(pattern, flags=__import__("re").M)[0]
        if line.isna().any(): return None
        line = line.str.replace(r" \(mean [\d.]+\)$", "", regex=True)  # hybrid_short's mean is not one more estimate
        return np.array([[float(x.rsplit(" ", 1)[-1]) for x in l.split(", ")] for l in line])
    X, Xt = numbers(train), numbers(test)
    if X is None or Xt is None: return None
    A = np.c_[X, np.ones(len(X))]
    w = np.linalg.lstsq(A, train.rating.to_numpy(float), rcond=None)[0]
    return np.clip(np.c_[Xt, np.ones(len(Xt))] @ w, 1, 5)


def tokens_per_example(tokenizer, prompts: pd.Series, n: int = 500) -> float:
    "Mean tokens the model reads per example (chat template + prompt + rating prefix + the rating and eos)."
    from movierec.model import model_input
    sample = prompts.sample(min(n, len(prompts)), random_state=0)
    return float(np.mean([len(x) + 2 for x in tokenizer([model_input(tokenizer, p) for p in sample], add_special_tokens=False)["input_ids"]]))


def run(args) -> dict:
    out = Path(args.out)
    pcfg = PrepareConfig(**{k: getattr(args, k) for k in PREPARE_KNOBS if getattr(args, k) is not None})
    data_dir = prepared(out, pcfg)
    data = load_prepared(data_dir)
    targets = sample_targets(data["test"], args.eval_sample, args.eval_seed)
    classic = load_classic(data_dir) if (data_dir / CLASSIC_FILE).exists() else {}
    missing = [m for m in CLASSIC_ROWS if m not in classic]
    if missing: classic.update(fit_classic(data["ratings"], seed=pcfg.seed, names=missing))
    preds = targets[["user_id", "movie_id", "rating", "history_len"]].copy()
    for name in CLASSIC_ROWS: preds[name] = classic[name].predict_pairs(targets.user_id.to_numpy(), targets.movie_id.to_numpy())
    stack = stack_of_estimates(data["train"], targets)
    if stack is not None: preds["stack"] = stack
    row = {"name": args.name, "n": len(targets), "prepare": pcfg.model_dump(mode="json"), "data": str(data_dir)}
    run_dir = out / "runs" / args.name
    if not args.no_train:
        from movierec.model import load_adapter
        from movierec.score import LMPredictor
        tcfg = TrainConfig(**{k: getattr(args, k) for k in TRAIN_KNOBS if getattr(args, k) is not None},
                           **({} if args.train_seed is None else {"seed": args.train_seed}))
        adapter = run_dir / "adapter"
        summary = json.loads((adapter / "train.json").read_text()) if (adapter / "train.json").exists() else train(data_dir, adapter, tcfg, progress=False)
        model, tokenizer = load_adapter(adapter)
        t0 = time.perf_counter()
        scored = LMPredictor(model, tokenizer, "lora", progress=False).predict(targets)
        preds["lora"] = scored.pred.to_numpy()
        row.update(train=tcfg.model_dump(mode="json"), train_s=summary["wall_s"], eval_s=summary.get("eval_s"),
                   steps=summary["steps"], n_train=summary["n_train"], train_tokens_per_s=summary["tokens_per_s"],
                   val_loss=summary.get("val_loss"), score_s=round(time.perf_counter() - t0, 1),
                   tokens_per_example=round(tokens_per_example(tokenizer, data["train"].prompt), 1))
    models = [m for m in ("lora", *CLASSIC_ROWS, "stack") if m in preds]
    err = {m: preds[m].to_numpy() - preds.rating.to_numpy() for m in models}
    row["rmse"] = {m: round(float(np.sqrt(np.mean(e ** 2))), 4) for m, e in err.items()}
    if "lora" in err:
        row["lora_minus"] = {m: [round(x, 4) for x in paired_bootstrap(err["lora"], err[m])] for m in models if m != "lora"}
    run_dir.mkdir(parents=True, exist_ok=True)
    preds.to_parquet(run_dir / "predictions.parquet", index=False)
    (run_dir / "result.json").write_text(json.dumps(row, indent=1))
    with open(out / "ablations.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
    return row


def table(out: Path) -> str:
    "Every row of `out/ablations.jsonl` as a markdown table (RMSE on the same test ratings; interval of lora - SVD++)."
    rows = [json.loads(l) for l in (out / "ablations.jsonl").read_text().splitlines() if l.strip()]
    cols = ["lora", "bias", "svd", "svdpp", "knn_baseline", "knn_user", "stack"]
    lines = ["| run | template | targets | history | examples | objective | lr | n test | " + " | ".join(cols)
             + " | lora - SVD++ [95% CI] | tokens/example | train s |", "|" + "---|" * (len(cols) + 11)]
    for r in rows:
        p, t, m = r["prepare"], r.get("train", {}), r["rmse"]
        ci = r.get("lora_minus", {}).get("svdpp")
        cells = [r["name"], p["template"], p["train_targets"], p["history"], r.get("n_train", "-"), t.get("objective", "-"),
                 t.get("learning_rate", "-"), r["n"], *[m.get(c, "-") for c in cols],
                 f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]" if ci else "-", r.get("tokens_per_example", "-"), r.get("train_s", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", help="this configuration's name (its folder under OUT/runs)")
    ap.add_argument("--out", default="bench-ablations", help="where prepared data, runs and ablations.jsonl go")
    ap.add_argument("--eval-sample", type=int, default=1000, help="test ratings scored by every model (the same for every run)")
    ap.add_argument("--eval-seed", type=int, default=42, help="seed of that sample")
    ap.add_argument("--no-train", action="store_true", help="only the classic models on the sampled ratings")
    ap.add_argument("--table", action="store_true", help="print the rows so far as markdown and exit")
    for k in PREPARE_KNOBS: ap.add_argument("--" + k.replace("_", "-"), type=int if k in ("max_per_user", "min_history", "folds", "seed") else str)
    for k, typ in TRAIN_KNOBS.items(): ap.add_argument("--" + k.replace("_", "-"), type=typ)
    ap.add_argument("--train-seed", type=int, help="training's seed (LoRA initialisation, data order), apart from --seed (the split's)")
    args = ap.parse_args(argv)
    if args.table: print(table(Path(args.out))); return
    if not args.name: ap.error("--name is required")
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
