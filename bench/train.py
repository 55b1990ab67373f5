"""Training speed: movierec's trainer against the seed's configuration, same model, same examples, one run.

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/train.py                 # SmolLM2 (about 3 minutes on 2 cores)
    .venv/bin/python bench/train.py --base-model tiny-llama --examples 32        # a quick check of the script

The seed padded every example to 2048 tokens and put the loss on the whole sequence (fp32, full
logits). movierec pads per batch (left), computes logits only for the rating position, and uses
bf16 autocast where it helps (`core.use_bf16`). Both train the same LoRA (`train.wrap_lora` with the
default `TrainConfig`: r=16 on q/k/v/o) on the same examples (ML-100K compact prompts from
`movierec.prompts.prepare`, the seeded sample `train.load_examples` draws).

"Useful tokens" are the real (non-padding) tokens of the examples, prompt and answer, counted the
same way for both, so their ratio is the ratio of examples per second. The seed runs its examples
one at a time with gradient accumulation (8 x 2048 tokens with full logits would need over 10 GB).
Our trainer runs in a subprocess through `movierec.train.train`, so its figures (s/step, peak RSS)
are the real ones from its train.json.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from movierec.model import load_base, model_input
from movierec.prompts import RATING_PREFIX, PrepareConfig, prepare
from movierec.train import TrainConfig, load_examples, tokenize_examples, wrap_lora

OURS = """
import json, sys
from movierec.train import TrainConfig, train
res = train(sys.argv[1], sys.argv[2], TrainConfig(**json.loads(sys.argv[3])), progress=False)
print("RESULT " + json.dumps(res))
"""


def seed_step_time(model, tok, prompts, responses, cfg: TrainConfig, seq_len=2048, grad_accum=8):
    "The seed's way: right-pad each example to `seq_len`, labels = the whole sequence (padding masked), fp32."
    peft = wrap_lora(model, cfg)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=cfg.learning_rate)
    peft.train()
    times, useful = [], 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        text = model_input(tok, p) + r[len(RATING_PREFIX):] + tok.eos_token
        enc = tok(text, add_special_tokens=False, padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        t0 = time.perf_counter()
        loss = peft(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss / grad_accum
        loss.backward()
        if (i + 1) % grad_accum == 0 or i == len(prompts) - 1: opt.step(); opt.zero_grad()
        times.append(time.perf_counter() - t0)
        useful += int(enc.attention_mask.sum())
        print(f"  seed example {i + 1}/{len(prompts)}: {times[-1]:.1f} s, loss {loss.item() * grad_accum:.3f}", flush=True)
    return sum(times), useful


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="default", help="default (SmolLM2 GGUF), tiny-llama, a .gguf or an HF id")
    ap.add_argument("--examples", type=int, default=64, help="examples our trainer runs (batch 8)")
    ap.add_argument("--seed-examples", type=int, default=4, help="the first of those that the seed config runs (each ~20 s on 2 cores)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        prepare(PrepareConfig(dataset="ml-100k", seed=0), d / "data")
        cfg = TrainConfig(base_model=None if args.base_model == "default" else args.base_model, train_examples=args.examples,
                          val_examples=0, batch_size=args.batch_size, epochs=1, save_steps=10_000, logging_steps=1)
        print(f"ours: movierec.train.train on {args.examples} examples, batch {args.batch_size} (subprocess)", flush=True)
        res = subprocess.run([sys.executable, "-c", OURS, str(d / "data"), str(d / "ours"), cfg.model_dump_json()],
                             capture_output=True, text=True)
        if res.returncode != 0: sys.exit(res.stderr[-3000:])
        ours = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))[7:])

        # the same examples, in the same seeded sample `train` draws
        df, _ = load_examples(d / "data", cfg)
        model, tok = load_base(cfg.base_model, device="cpu")
        ids, _ = tokenize_examples(tok, df.prompt, df.response)
        useful_per_example = float(np.mean([len(x) for x in ids]))      # prompt + answer + eos, no padding
        print(f"seed: {args.seed_examples} of those examples padded to 2048, loss over the whole sequence, fp32", flush=True)
        seed_s, seed_tokens = seed_step_time(model, tok, df.prompt[:args.seed_examples], df.response[:args.seed_examples], cfg)

    ours_eps, seed_eps = ours["examples_per_s"], args.seed_examples / seed_s
    print()
    print(f"model: {args.base_model}, device: {ours['device']} ({torch.get_num_threads()} threads), bf16 autocast: {ours['bf16']}")
    print(f"useful tokens per example (prompt + answer, no padding): {useful_per_example:.0f}; longest in our batches: {ours['max_length']}")
    print(f"{'':28s}{'examples/s':>12s}{'useful tok/s':>14s}{'loss tok/s':>12s}{'s/step (8)':>12s}{'peak RSS MB':>13s}")
    print(f"{'seed (pad 2048, whole seq)':28s}{seed_eps:12.3f}{seed_tokens / seed_s:14.1f}{seed_tokens / seed_s:12.1f}{8 / seed_eps:12.1f}"
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:13.0f}")
    print(f"{'movierec (rating objective)':28s}{ours_eps:12.3f}{ours_eps * useful_per_example:14.1f}{ours['loss_tokens_per_s']:12.2f}"
          f"{ours['s_per_step']:12.2f}{ours['peak_rss_mb']:13.0f}")
    print(f"ratio of useful tokens/s (= examples/s): {ours_eps / seed_eps:.1f}x (goal >= 5x)")
    print(json.dumps({"ours": {k: ours[k] for k in ("examples_per_s", "tokens_per_s", "s_per_step", "peak_rss_mb", "steps", "wall_s", "bf16")},
                      "seed": {"examples_per_s": round(seed_eps, 4), "useful_tokens_per_s": round(seed_tokens / seed_s, 1), "examples": args.seed_examples},
                      "ratio": round(ours_eps / seed_eps, 2)}))


if __name__ == "__main__":
    main()
