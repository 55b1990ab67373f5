"""How fast, and how good, is two-stage recommendation? Run by hand, under the CPU lock:

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/recommend.py --run /tmp/new-run [--users 10] [--eval-users 943]

`--run` is a run folder (its data/, adapter/ and gguf/); or give --data, --adapter and --gguf.

1. Seconds per user, after the model is loaded, for one user's top 50 (`--candidates`):
   - retrieval: each retriever ranks the user's whole unseen catalogue (fitting is timed once);
   - re-ranking in PyTorch with the shared user prefix (`score.score_candidates`; where the CPU has
     bf16 kernels, the merged bf16 copy `score.reranking_model` gives, as `recommend` runs it, against
     the PEFT model under bf16 autocast, the form before it; and fp32 for scale), split into
     prompt building, tokenising, the prefix's forward pass and the candidates' passes, with the
     prefix and per-candidate token counts;
   - the same prompts scored in full, one by one in batches (`score.score_prompts`), for scale;
   - re-ranking through Ollama (`serve.ollama_predict`: the llama.cpp runner keeps each slot's
     prompt cache, so a slot that scored one candidate of a user reuses the profile for the next),
     with the run's GGUF export (F16 base + adapter), `--concurrency` requests in flight;
   and how far Ollama's expected ratings are from PyTorch's on those candidates.
2. With `--eval-users N`: `recommend.ranking_metrics` on N users (the full-catalogue table, the
   1+99 sampled table and the cold-start table, each with paired bootstrap intervals), printed as
   markdown and written to `--out` (JSON + the per-user parquet).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

# `python bench/recommend.py` puts bench/ first on sys.path, where bench/ollama.py would shadow the ollama package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

from movierec.core import RunLayout, write_json
from movierec.model import adapter_tasks, load_adapter
from movierec.prompts import prompts_for_user
from movierec.recommend import (RANKING_METRICS, RecommendConfig, _history, _test_start, evaluation_users, prepared_dataset, prompt_setting,
                                ranking_metrics)
from movierec.retrieve import fit_retrievers, rank_unseen
from movierec.score import fast_bf16, reranking_model, score_candidates, score_prompts
# the scorer's own steps, to time them apart
from movierec.score import _autocast, _common_prefix, _device, _encode


def timed(f, *a, **kw):
    t0 = time.perf_counter(); out = f(*a, **kw)
    return out, time.perf_counter() - t0


def bench_retrieval(cfg, ml, ratings, users) -> tuple[dict, dict]:
    "Seconds to fit each retriever, seconds per user to rank the unseen catalogue; and itemknn's top candidates per user."
    hist = _history(ratings, True)
    out, tops = {}, {}
    for name in cfg.retrievers:
        (w, fitted), fit_s = timed(fit_retrievers, hist, ml.movies.movie_id, [name], cfg.neighbours, cfg.factors, cfg.seed)
        r = fitted[name]
        t0 = time.perf_counter()
        for u in users:
            rows = w.rows([u])
            cols = rank_unseen(r.scores(rows, w.user_index([u])), rows, cfg.rerank_n)[0]
            if name == cfg.retriever: tops[u] = w.movie_ids[cols[cols >= 0]]
        out[name] = {"fit_s": round(fit_s, 2), "per_user_s": round((time.perf_counter() - t0) / len(users), 4)}
    return out, tops


def bench_torch(model, tok, ml, ratings, template, users, tops, starts, ctx, enjoy: bool = False, bf16: bool = False) -> tuple[dict, dict]:
    """Seconds per user of each step of re-ranking in PyTorch (with `bf16`, the form `recommend` runs with score_bf16 auto: on a CPU
    `reranking_model`'s merged bf16 copy; the PEFT model under autocast for comparison), the same in fp32 for scale, and the fp32 scores. With `enjoy` (an adapter that learned the second task), also both tasks at
    once (each candidate's tail run once) against the two tasks scored one after the other. `ctx`: the prompts' setting."""
    parts = {k: 0.0 for k in ("prompts", "tokenise", "prefix_forward", "score_candidates", "score_candidates_peft_autocast",
                              "score_candidates_fp32", "score_prompts_unshared")}
    fast_model = reranking_model(model, bf16)
    bf16_diff = []
    if enjoy: parts.update(both_tasks_shared_tail=0.0, both_tasks_one_by_one=0.0)
    tokens = {"prefix": [], "tail": []}
    scores = {}
    for m, ac in ((model, False), (model, bf16), (fast_model, bf16)):  # warm-up
        score_candidates(m, tok, prompts_for_user(ml, ratings, users[0], tops[users[0]][:4], template, at_time=starts[users[0]], ctx=ctx), autocast=ac)
    for i, u in enumerate(users):
        prompts, s = timed(prompts_for_user, ml, ratings, u, tops[u], template, at_time=starts[u], ctx=ctx); parts["prompts"] += s
        enc, s = timed(_encode, tok, prompts); parts["tokenise"] += s
        n = _common_prefix(enc)
        tokens["prefix"].append(n); tokens["tail"] += [len(e) - n for e in enc]
        with torch.inference_mode(), _autocast(fast_model, bf16):
            _, s = timed(fast_model, input_ids=torch.tensor([enc[0][:n]], device=_device(model)), use_cache=True, logits_to_keep=1)
        parts["prefix_forward"] += s
        fast, s = timed(score_candidates, fast_model, tok, prompts, batch_size=16, autocast=bf16); parts["score_candidates"] += s
        parts["score_candidates_peft_autocast"] += timed(score_candidates, model, tok, prompts, batch_size=16, autocast=bf16)[1]
        scores[u], s = timed(score_candidates, model, tok, prompts, batch_size=16, autocast=False); parts["score_candidates_fp32"] += s
        bf16_diff.append(np.abs(fast.pred.to_numpy() - scores[u].pred.to_numpy()))
        if i < 2: parts["score_prompts_unshared"] += timed(score_prompts, fast_model, tok, prompts, batch_size=16, progress=False, autocast=bf16)[1]
        if enjoy:
            parts["both_tasks_shared_tail"] += timed(score_candidates, fast_model, tok, prompts, batch_size=16, task=("rating", "enjoy"), autocast=bf16)[1]
            parts["both_tasks_one_by_one"] += sum(timed(score_candidates, fast_model, tok, prompts, batch_size=16, task=t, autocast=bf16)[1]
                                                  for t in ("rating", "enjoy"))
    per_user = {k: v / len(users) for k, v in parts.items()}
    per_user["score_prompts_unshared"] = parts["score_prompts_unshared"] / min(2, len(users))
    per_user["candidates_forward"] = per_user["score_candidates"] - per_user["prefix_forward"] - per_user["tokenise"]
    per_user["total_rerank"] = per_user["prompts"] + per_user["score_candidates"]
    return {"bf16": bf16, "form": "reranking_model (merged, bf16 weights, fp32 head)" if fast_model is not model else "as loaded",
            "speedup_vs_peft_autocast": round(parts["score_candidates_peft_autocast"] / parts["score_candidates"], 2),
            "pred_abs_diff_bf16_vs_fp32": float(np.concatenate(bf16_diff).mean()),
            "seconds_per_user": {k: round(v, 3) for k, v in per_user.items()},
            "tokens": {"prefix_mean": float(np.mean(tokens["prefix"])), "tail_mean": float(np.mean(tokens["tail"]))}}, scores


def bench_ollama(gguf: Path, tok, ml, ratings, template, users, tops, starts, ctx, torch_scores, concurrency: int) -> dict:
    "Seconds per user through Ollama (the run's GGUF export), and its distance from PyTorch's expected ratings."
    from movierec.serve import create_model, ollama_client, ollama_predict
    with ollama_client("auto", num_parallel=concurrency) as (client, _):
        create_model(client, "movierec-bench-rec", gguf / "base-f16.gguf", gguf / "adapter.gguf", overwrite=True)
        first = prompts_for_user(ml, ratings, users[0], tops[users[0]][:concurrency], template, at_time=starts[users[0]], ctx=ctx)
        ollama_predict(client, "movierec-bench-rec", first, tok, concurrency=concurrency)  # loads the model
        total, diffs = 0.0, []
        for u in users:
            prompts = prompts_for_user(ml, ratings, u, tops[u], template, at_time=starts[u], ctx=ctx)
            out, s = timed(ollama_predict, client, "movierec-bench-rec", prompts, tok, concurrency=concurrency)
            total += s
            diffs.append(np.abs(out.pred.to_numpy() - torch_scores[u].pred.to_numpy()))
    d = np.concatenate(diffs)
    return {"seconds_per_user": round(total / len(users), 3), "concurrency": concurrency,
            "pred_abs_diff_vs_torch": {"mean": float(d.mean()), "max": float(d.max())}}


def table_md(rows: list[dict]) -> str:
    "A ranking table as markdown: each metric with its 95% interval, coverage, and NDCG@10 / Recall@20 gains with intervals."
    out = ["| model | users | " + " | ".join(RANKING_METRICS) + " | coverage | NDCG@10 vs own retriever | vs itemknn: NDCG@10, Recall@20 |",
           "|---" * (len(RANKING_METRICS) + 5) + "|"]
    fmt = lambda v, ci: f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    gain = lambda d: f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
    for r in rows:
        own = r["vs"].get(r["model"].split("+")[0]) if "+" in r["model"] else None
        knn = r["vs"].get("itemknn")
        out.append(f"| {r['model']} | {r['users']} | " + " | ".join(fmt(r[k], r["ci95"][k]) for k in RANKING_METRICS)
                   + f" | {r['coverage']:.3f} | {gain(own['ndcg@10']) if own else ''} | "
                   + (f"{gain(knn['ndcg@10'])}, {gain(knn['recall@20'])}" if knn else "") + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a run folder (data/, adapter/, gguf/)")
    ap.add_argument("--data", type=Path); ap.add_argument("--adapter", type=Path); ap.add_argument("--gguf", type=Path)
    ap.add_argument("--users", type=int, default=10, help="users timed")
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=4, help="Ollama requests in flight (= its parallel slots)")
    ap.add_argument("--no-ollama", action="store_true")
    ap.add_argument("--eval-users", type=int, default=0, help="also run ranking_metrics on this many users (943: all of ML-100K)")
    ap.add_argument("--sampled-users", type=int, default=None); ap.add_argument("--cold-start-users", type=int, default=None)
    ap.add_argument("--rerank-retrievers", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, the number of cores)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/movierec-bench-recommend"))
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    run = RunLayout(a.run) if a.run else None
    data, adapter, gguf = a.data or run.data, a.adapter or run.adapter, a.gguf or (run.gguf if run else None)
    cfg = RecommendConfig(rerank_n=a.candidates, seed=0)
    ml, ratings, template = prepared_dataset(data)
    users = evaluation_users(ratings, a.users, seed=1).tolist()
    starts = _test_start(ratings)
    # PyTorch's threads spin at their barriers: another busy process on a 2-core machine slows them many times over
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{len(users)} users, {a.candidates} candidates each")
    result = {"users": len(users), "candidates": a.candidates, "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0]}
    result["retrieval"], tops = bench_retrieval(cfg, ml, ratings, users)
    print("retrieval:", json.dumps(result["retrieval"]))
    (model, tok), load_s = timed(load_adapter, adapter)
    result["load_model_s"] = round(load_s, 1)
    result["tasks"] = adapter_tasks(adapter)
    ctx = prompt_setting(data, ml, ratings, template)   # the data folder's fitted classic models, as recommend reads them
    result["torch"], scores = bench_torch(model, tok, ml, ratings, template, users, tops, starts, ctx, enjoy="enjoy" in result["tasks"],
                                          bf16=fast_bf16(model))
    print("torch:", json.dumps(result["torch"]))
    if not a.no_ollama and gguf:
        result["ollama"] = bench_ollama(Path(gguf), tok, ml, ratings, template, users, tops, starts, ctx, scores, a.concurrency)
        print("ollama:", json.dumps(result["ollama"]))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.eval_users:
        ecfg = RecommendConfig(ranking_users=a.eval_users, rerank_n=a.candidates,
                               **{k: v for k, v in {"sampled_users": a.sampled_users, "cold_start_users": a.cold_start_users,
                                                    "rerank_retrievers": a.rerank_retrievers}.items() if v is not None})
        rk, s = timed(ranking_metrics, ecfg, data, model, tok)
        rk.pop("per_user").to_parquet(a.out / "ranking_users.parquet", index=False)
        rk["wall_s"] = round(s, 1)
        result["ranking"] = rk
        for key, title in (("models", "full catalogue"), ("sampled", "sampled 1+99"), ("cold_start", "cold start")):
            part = rk if key == "models" else rk.get(key)
            if part: print(f"\n### {title}: {part['users']} users\n\n" + table_md(part["models"]))
        print("\nseconds:", json.dumps(rk["seconds"]), f"wall {s:.0f} s")
    result["load_average_end"] = os.getloadavg()[0]
    write_json(a.out / "bench.json", result)
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()
