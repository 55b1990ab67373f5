"""Does another form of the same model re-rank 50 candidates faster? Run by hand, under the CPU lock:

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/rerank_forms.py --run runs/default [--users 4] [--no-ollama]

For the default retriever's (item-kNN's) top `--candidates` of each user, seconds per user of `score.score_candidates` (shared user prefix, bf16
autocast as `recommend` runs it) for the PEFT model as `load_adapter` gives it (the baseline) and for other forms of it: the
adapter merged into the weights, merged with the Linear weights stored in bf16 (autocast then has nothing to re-cast), the
whole model in bf16 as it was tried first (its output head called on a non-contiguous slice), and `score.reranking_model`'s form
(merged, bf16 weights, an fp32 head on 2-D inputs: what `recommend` runs on a CPU with bf16 kernels); each as a ratio against the baseline measured in the same run, with how far its expected ratings are
from fp32's. Then Ollama (`--concurrency` slots) with the run's GGUF export as deployed (F16 base + adapter) against the
merged F16, a merged BF16 and Ollama's Q8_0 of the merged model, and Ollama's fixed cost per request (a 3-token prompt).

`--other RUN` adds another run's adapter on the same users and candidates, with the prompts of its own data (another prompt
template, e.g. `hybrid_lean`): as PEFT and as `reranking_model` builds it, against the same baseline, with the tokens of a
candidate's own part (what the user prefix's cache cannot share) for both; with Ollama, its deployed export too.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

# `python bench/x.py` puts bench/ first on sys.path, where bench/ollama.py would shadow the ollama package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

from movierec.core import RunLayout, write_json
from movierec.model import load_adapter
from movierec.prompts import prompts_for_user
from movierec.recommend import RecommendConfig, _history, _retrieve_all, _test_start, evaluation_users, prepared_dataset, prompt_setting
from movierec.retrieve import fit_retrievers
from movierec.score import _common_prefix, _encode, reranking_model, score_candidates


def candidate_prompts(data, users: int, candidates: int) -> dict:
    "Each evaluated user's (candidates, prompts) for the default retriever's top candidates, as `recommend` builds them before the test period."
    cfg = RecommendConfig()
    ml, ratings, template = prepared_dataset(data)
    us = evaluation_users(ratings, users, seed=1)
    starts = _test_start(ratings)
    w, fitted = fit_retrievers(_history(ratings, True), ml.movies.movie_id, [cfg.retriever], cfg.neighbours, cfg.factors, cfg.seed)
    lists = _retrieve_all(fitted, w, w.rows(us), w.user_index(us))[cfg.retriever]
    ctx = prompt_setting(data, ml, ratings, template)
    return {u: (top[:candidates].tolist(), prompts_for_user(ml, ratings, u, top[:candidates], template, at_time=starts[u], ctx=ctx))
            for u, top in zip(us.tolist(), lists)}


def tail_tokens(tok, prompts: dict) -> float:
    "Mean tokens of a candidate's own part: the model input after the prefix its user's candidates share."
    tails = []
    for p in prompts.values():
        enc = _encode(tok, p)
        n = _common_prefix(enc)
        tails += [len(e) - n for e in enc]
    return round(float(np.mean(tails)), 1)


def linear_bf16(merged):
    "A copy of a merged model with its Linear weights in bf16 (autocast then has nothing to re-cast); the tied lm_head stays fp32."
    m = copy.deepcopy(merged)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear) and mod is not m.lm_head: mod.to(torch.bfloat16)
    return m


def torch_forms(model) -> dict:
    "The forms compared: name -> (model, autocast)."
    merged = copy.deepcopy(model).merge_and_unload()
    return {"peft (baseline)": (model, True), "merged": (merged, True), "merged, Linear weights bf16": (linear_bf16(merged), True),
            "merged, all weights bf16, head on a non-contiguous slice": (copy.deepcopy(merged).to(torch.bfloat16), False),
            "reranking_model: merged, bf16 weights, fp32 head (recommend's form)": (reranking_model(model, True), True)}


def bench_torch(forms: dict, tok) -> list[dict]:
    """Seconds per user of each form (name -> (model, autocast, prompts per user)), users interleaved so that the machine's drift
    hits every form alike; the first form is the baseline, and each form's expected ratings are compared with its model's in fp32."""
    ref = {}
    for k, (m, ac, prompts) in forms.items():
        if id(prompts) not in ref: ref[id(prompts)] = {u: score_candidates(m, tok, p, autocast=False).pred.to_numpy() for u, p in prompts.items()}
        score_candidates(m, tok, next(iter(prompts.values()))[:8], autocast=ac)   # warm-up
    secs = {k: [] for k in forms}; diff = {k: [] for k in forms}
    for u in next(iter(forms.values()))[2]:
        for k, (m, ac, prompts) in forms.items():
            t0 = time.perf_counter(); pred = score_candidates(m, tok, prompts[u], autocast=ac).pred.to_numpy()
            secs[k].append(time.perf_counter() - t0); diff[k].append(np.abs(pred - ref[id(prompts)][u]))
    base = np.array(next(iter(secs.values())))
    return [{"form": k, "s_per_user": round(float(np.mean(s)), 3), "speedup_vs_baseline": round(float(base.sum() / np.sum(s)), 2),
             "per_user_ratios": [round(float(x), 2) for x in base / np.array(s)],
             "mean_abs_diff_vs_fp32": round(float(np.concatenate(diff[k]).mean()), 4)} for k, s in secs.items()]


def bf16_gguf(src: Path, out: Path) -> Path:
    "A copy of an F16 GGUF with its matrices in BF16 (ggml's sgemm has AVX512-BF16 dot products)."
    import gguf
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(out, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"): continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if len(t.shape) > 1: w.add_tensor(t.name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else: w.add_tensor(t.name, x)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return out


def bench_ollama(gguf_dir: Path, tok, prompts: dict, concurrency: int, tmp: Path, other: tuple | None = None) -> dict:
    "Seconds per user of each served form (and of `other`: (its gguf folder, its prompts), deployed the same way), and the fixed cost of one request."
    from movierec.serve import create_model, ollama_client, ollama_predict
    variants = {"f16-adapter (baseline)": (gguf_dir / "base-f16.gguf", gguf_dir / "adapter.gguf", None, prompts),
                "merged-f16": (gguf_dir / "merged-f16.gguf", None, None, prompts),
                "merged-bf16": (bf16_gguf(gguf_dir / "merged-f16.gguf", tmp / "merged-bf16.gguf"), None, None, prompts),
                "merged-q8_0": (gguf_dir / "merged-f16.gguf", None, "q8_0", prompts)}
    if other: variants["other-f16-adapter (--other, its own prompts)"] = (other[0] / "base-f16.gguf", other[0] / "adapter.gguf", None, other[1])
    out = {"concurrency": concurrency, "forms": []}
    with ollama_client("auto", num_parallel=concurrency) as (client, _):
        for k, (base, adapter, q, ps) in variants.items():
            name = "bench-forms-" + k.split(" ")[0]
            create_model(client, name, base, adapter, overwrite=True, quantize=q)
            ollama_predict(client, name, next(iter(ps.values()))[:concurrency], tok, concurrency=concurrency)   # loads it
            t0 = time.perf_counter()
            for p in ps.values(): ollama_predict(client, name, p, tok, concurrency=concurrency)
            out["forms"].append({"form": k, "s_per_user": round((time.perf_counter() - t0) / len(ps), 2)})
        base = out["forms"][0]["s_per_user"]
        for f in out["forms"]: f["speedup_vs_baseline"] = round(base / f["s_per_user"], 2)
        opts = {"temperature": 0, "num_predict": 1, "num_ctx": 256}
        one = lambda i: client.generate(model="bench-forms-merged-f16", prompt=f"Rate {i}", raw=True, logprobs=True, top_logprobs=20, options=opts)
        rs = [one(i) for i in range(15)]
        out["fixed_cost_ms"] = {k: round(float(np.median([getattr(r, k) or 0 for r in rs])) / 1e6, 1)
                                for k in ("total_duration", "load_duration", "prompt_eval_duration")}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder (data/, adapter/, gguf/)")
    ap.add_argument("--users", type=int, default=4); ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=4); ap.add_argument("--no-ollama", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp/movierec-bench-rerank-forms"))
    ap.add_argument("--other", type=Path, help="another run folder (its own data/ and adapter/, e.g. another template) on the same candidates")
    a = ap.parse_args()
    run = RunLayout(a.run)
    cands = candidate_prompts(run.data, a.users, a.candidates)
    prompts = {u: p for u, (_, p) in cands.items()}
    model, tok = load_adapter(run.adapter)
    forms = {k: (m, ac, prompts) for k, (m, ac) in torch_forms(model).items()}
    result = {"users": len(prompts), "candidates": a.candidates, "tail_tokens": {"run": tail_tokens(tok, prompts)}}
    other = RunLayout(a.other) if a.other else None
    if other:
        other_cands = candidate_prompts(other.data, a.users, a.candidates)
        if {u: c for u, (c, _) in other_cands.items()} != {u: c for u, (c, _) in cands.items()}:
            raise SystemExit(f"--other {a.other}: its users or candidates differ from {a.run}'s (another split or training ratings)")
        other_prompts = {u: p for u, (_, p) in other_cands.items()}
        other_model = load_adapter(other.adapter)[0]
        forms["other (peft)"] = (other_model, True, other_prompts)
        forms["other, reranking_model"] = (reranking_model(other_model, True), True, other_prompts)
        result["tail_tokens"]["other"] = tail_tokens(tok, other_prompts)
    print(json.dumps(result))
    result["torch"] = bench_torch(forms, tok)
    for r in result["torch"]: print(json.dumps(r))
    a.out.mkdir(parents=True, exist_ok=True)   # the BF16 GGUF is written there too
    if not a.no_ollama:
        result["ollama"] = bench_ollama(Path(run.gguf), tok, prompts, a.concurrency, a.out,
                                        (Path(other.gguf), other_prompts) if other else None)
        print(json.dumps(result["ollama"]))
    write_json(a.out / "bench.json", result)
    print(f"written to {a.out / 'bench.json'}")


if __name__ == "__main__":
    main()
