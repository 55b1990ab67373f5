"""How fast is rating prediction? Run by hand, under the CPU lock:

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/score.py [--n 48] [--candidates 50]

1. Predictions per second of the probability method (`score_prompts`: one forward pass, the
   logits of the last position) against generate-and-parse (`generate_and_parse`, defined here:
   the seed's greedy generation, then a regex) on the same model (SmolLM2 by default) and the same test prompts of
   ML-100K, in this one run; goal >= 10x. Generation is timed twice: the seed's configuration (one
   prompt at a time, the whole response: `--seed-new-tokens`) and our batched one (batch 8, 16 new
   tokens, the most favourable to generation). float32 and bf16 autocast are both timed for the
   probability method, and how far bf16 moves the expected rating.
2. One user's 50 candidate movies: `score_candidates` (the shared profile's KV cache computed once)
   against `score_prompts` on the same prompts (each candidate scored in full), and the largest
   difference between the two.
"""
import argparse
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from movierec.core import seed_everything
from movierec.data import load_movielens, split_by_time
from movierec.model import load_base, model_input
from movierec.prompts import PrepareConfig, load_prepared, prepare, prompts_for_user
from movierec.score import score_candidates, score_prompts
# the scorer's own tokenising, padding and batching, so that both methods see the same inputs
from movierec.score import _batches, _device, _encode, _left_pad, _pad_id, _progress

# The seed's method, kept here as the comparator: greedy generation after `Rating Prediction: `, read by a
# regular expression. `parse_rating` looks first for `Rating Prediction: N`, then for a number at the very
# start of the text (what follows the `Rating Prediction: ` already in the input), then for `N/5` anywhere.
# An answer with no rating is None: a parse failure, never turned into a 3.
_NUM = r"([1-5](?:\.\d+)?)(?![\d.]*\d)"
_RATING_PATTERNS = [re.compile(r"Rating\s*Prediction\s*:\s*" + _NUM, re.I),
                    re.compile(r"^\s*\**\s*" + _NUM),
                    re.compile(r"(?<![\d.])" + _NUM + r"\s*(?:/\s*5|out of 5)(?!\d)", re.I)]


def parse_rating(text: str | None) -> float | None:
    "The rating (1-5) a generated text states, or None when it states none."
    if not text: return None
    for pat in _RATING_PATTERNS:
        if m := pat.search(text): return float(m.group(1))
    return None


def generate_and_parse(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 8,
                       progress: bool = True) -> pd.DataFrame:
    "The seed's method: greedy generation after `Rating Prediction: `, then `parse_rating`; `pred` is NaN when unparseable."
    enc = _encode(tokenizer, prompts)
    texts: list[str] = [""] * len(enc)
    order = np.argsort([len(e) for e in enc], kind="stable")
    dev = _device(model)
    with torch.inference_mode():
        for batch in _progress(_batches(order, batch_size), progress, "generating"):
            input_ids, mask = _left_pad([enc[i] for i in batch], _pad_id(tokenizer))
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=_pad_id(tokenizer),
                                 eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(batch, out[:, input_ids.shape[1]:].tolist()):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    pred = [parse_rating(t) for t in texts]
    return pd.DataFrame({"pred": np.array([np.nan if p is None else p for p in pred], dtype=float), "text": texts})


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default=None, help="GGUF, folder or HF id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--n", type=int, default=32, help="test prompts for the method comparison")
    ap.add_argument("--candidates", type=int, default=50, help="candidate movies of one user")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16, help="new tokens for batched generation")
    ap.add_argument("--seed-new-tokens", type=int, default=64, help="new tokens for the seed's one-at-a-time generation "
                    "(its response held the rating, a reasoning and a confidence line)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    seed_everything(0)

    ml = load_movielens("ml-100k")
    with tempfile.TemporaryDirectory() as d:
        prepare(PrepareConfig(max_per_user=1, seed=0), Path(d), ml=ml)
        test = load_prepared(d)["test"].sample(n=args.n, random_state=0)
    prompts = test.prompt.tolist()
    model, tok = load_base(args.base_model)
    lens = [len(tok(model_input(tok, p), add_special_tokens=False).input_ids) for p in prompts]
    print(f"model: {args.base_model or 'SmolLM2-135M-Instruct (GGUF, dequantized)'}, device "
          f"{next(model.parameters()).device}, torch threads {torch.get_num_threads()}")
    print(f"{len(prompts)} ML-100K test prompts, {np.mean(lens):.0f} tokens on average (min {min(lens)}, max {max(lens)})")

    score_prompts(model, tok, prompts[:4], batch_size=4, progress=False, autocast=False)  # warm-up
    fp32, t_fp32 = timed(score_prompts, model, tok, prompts, batch_size=args.batch_size, progress=False, autocast=False)
    bf16, t_bf16 = timed(score_prompts, model, tok, prompts, batch_size=args.batch_size, progress=False, autocast=True)
    gen, t_gen = timed(generate_and_parse, model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=8, progress=False)
    seed, t_seed = timed(generate_and_parse, model, tok, prompts, max_new_tokens=args.seed_new_tokens, batch_size=1, progress=False)
    t_prob = min(t_fp32, t_bf16)
    n = len(prompts)
    print("\n## Probability method vs generate-and-parse (same model, same prompts)")
    print(f"probability, fp32, batch {args.batch_size}: {n / t_fp32:7.2f} predictions/s ({sum(lens) / t_fp32:.0f} prompt tokens/s)")
    print(f"probability, bf16 autocast:      {n / t_bf16:7.2f} predictions/s (mean |expected fp32 - bf16| "
          f"{np.abs(fp32.pred - bf16.pred).mean():.4f}, argmax agreement {(fp32.argmax == bf16.argmax).mean():.1%})")
    print(f"seed's way, generate {args.seed_new_tokens} tokens + regex, one prompt at a time: {n / t_seed:7.2f} predictions/s, "
          f"{seed.pred.isna().sum()} of {n} answers unparseable")
    print(f"batched, generate {args.max_new_tokens} tokens + regex, batch 8: {n / t_gen:7.2f} predictions/s, "
          f"{gen.pred.isna().sum()} of {n} answers unparseable")
    print(f"ratio, best probability vs the seed's way: {t_seed / t_prob:.1f}x  (goal >= 10x)")
    print(f"ratio, best probability vs batched generation: {t_gen / t_prob:.1f}x")
    print("examples of generated text:", [t[:40] for t in gen.text.head(3)])
    ok = gen.pred.notna()
    if ok.any():
        print(f"where both answer: mean |expected - parsed| {np.abs(fp32.pred[ok] - gen.pred[ok]).mean():.3f}, "
              f"parsed == argmax {(fp32.argmax[ok] == gen.pred[ok]).mean():.1%}")

    # one user with many movies they have not rated: the recommendation workload
    sr = split_by_time(ml.ratings)
    user = int(sr.user_id.value_counts().index[len(sr.user_id.unique()) // 2])  # a user of median activity
    seen = set(sr.loc[sr.user_id == user, "movie_id"])
    rng = np.random.default_rng(0)
    movies = [int(m) for m in rng.permutation(ml.movies.movie_id.to_numpy()) if m not in seen][:args.candidates]
    cands = prompts_for_user(ml, sr, user, movies)
    ids = [tok(model_input(tok, p), add_special_tokens=False).input_ids for p in cands]
    shared = next(i for i in range(min(map(len, ids))) if len({s[i] for s in ids}) > 1)
    full, t_full = timed(score_prompts, model, tok, cands, batch_size=args.batch_size, progress=False, autocast=False)
    reuse, t_reuse = timed(score_candidates, model, tok, cands, batch_size=args.batch_size, autocast=False)
    print(f"\n## {len(cands)} candidates of user {user}: {np.mean(list(map(len, ids))):.0f} tokens each, {shared} shared")
    print(f"each candidate in full (score_prompts): {t_full:6.2f} s, {len(cands) / t_full:6.2f} candidates/s")
    print(f"shared prefix reused (score_candidates): {t_reuse:6.2f} s, {len(cands) / t_reuse:6.2f} candidates/s")
    print(f"ratio: {t_full / t_reuse:.1f}x; max |difference| in expected rating {np.abs(full.pred - reuse.pred).max():.2e}, "
          f"argmax agreement {(full.argmax == reuse.argmax).mean():.0%}")


if __name__ == "__main__":
    main()
