"""The GPU path, end to end in a few minutes on one GPU (run by bench/gpu_check.sh, which installs what it needs).

    bash bench/gpu_check.sh                                   # on a machine with a CUDA GPU
    flock /tmp/movierec-cpu.lock .venv/bin/python bench/gpu_check.py --smoke    # the same steps, tiny, on a CPU

Steps, each timed, each on the library's own calls (`movierec.train.train`, `movierec.score.score_prompts`):
1. LoRA on SmolLM2-135M-Instruct in bf16 on all of ML-100K's training examples (one epoch);
2. every test rating scored with the adapter (the expected rating over the five rating tokens), with its RMSE;
3. a few steps in 4 bits (QLoRA through bitsandbytes, movierec's `cuda` extra) on the same base, saved as a
   Hugging Face folder first (bitsandbytes quantizes HF checkpoints, not GGUF files);
4. with two GPUs or more: the same steps on one GPU (batch 2b) and on two processes (batch b each, `nproc=2`).
For each it prints tokens/s, peak GPU memory and model FLOP utilisation (MFU) against the card's dense bf16
peak (`PEAK_BF16_TFLOPS`, or `--peak-tflops`), and writes everything to `gpu_check.json` in `--out`.

Model FLOPs per token, with N the non-embedding parameters, L layers, d the hidden size and T the mean
sequence length (attention counted over the whole sequence, as PaLM's appendix does): training
4N + 12LdT (the frozen base needs gradients with respect to its inputs, not its weights; LoRA's own FLOPs are
under 2% and left out), scoring 2N + 4LdT. The vocabulary projection is computed for the answer position
only (`logits_to_keep`), so it is left out too.

`--smoke` runs every step on the CPU with `tiny-llama`, a few examples and gloo for the two processes, the
4-bit step in full precision (bitsandbytes needs CUDA): it checks the script, not the GPU.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# dense bf16 tensor-core peaks (no sparsity), TFLOPS, from NVIDIA's data sheets; matched in order on the device name
PEAK_BF16_TFLOPS = [("H200 NVL", 835.0), ("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
                    ("A10", 125.0)]


def peak_tflops(name: str) -> float | None:
    "The card's dense bf16 peak by its device name, None when the table does not know it."
    return next((p for key, p in PEAK_BF16_TFLOPS if key in name), None)


def model_shape(model) -> dict:
    "Non-embedding parameters, layers and hidden size of a (possibly PEFT-wrapped, possibly 4-bit) causal LM."
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"n_nonembed": total - embed, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def flops_per_token(shape: dict, seq_len: float, training: bool) -> float:
    n, attn = shape["n_nonembed"], shape["layers"] * shape["hidden"] * seq_len
    return 4 * n + 12 * attn if training else 2 * n + 4 * attn


def mfu(tokens_per_s: float, per_token: float, peak: float | None, n_gpus: int = 1) -> float | None:
    return None if not peak else tokens_per_s * per_token / (peak * 1e12 * n_gpus)


def row(step: str, res: dict, shape: dict, seq_len: float, training: bool, peak: float | None, n_gpus: int = 1) -> dict:
    per_token = flops_per_token(shape, seq_len, training)
    return {"step": step, "gpus": n_gpus, "tokens_per_s": res["tokens_per_s"], "peak_gpu_mb": res.get("peak_cuda_mb"),
            "tflops": float(f"{res['tokens_per_s'] * per_token / 1e12:.3g}"),  # 3 significant digits: a tiny CPU model is far below 0.01
            "mfu": None if (m := mfu(res["tokens_per_s"], per_token, peak, n_gpus)) is None else round(m, 4),
            "seconds": res.get("wall_s"), **{k: res[k] for k in ("steps", "examples", "rmse", "train_loss", "val_loss") if k in res}}


def train_step(data, out, cfg, label: str) -> dict:
    from movierec.train import train
    print(f"\n== {label}: {cfg.model_dump(exclude_defaults=True)}", flush=True)
    res = train(data, out, cfg, progress=False)
    print(f"   {res['steps']} steps, {res['tokens_per_s']:.0f} tokens/s, peak GPU {res.get('peak_cuda_mb')} MB, "
          f"train loss {res['train_loss']}, val loss {res['val_loss']}", flush=True)
    return res


def score_step(data, adapter, batch_size: int, limit: int | None, device: str) -> tuple[dict, float, object]:
    "Every test rating (or the first `limit`) scored with the adapter: speed, peak memory, RMSE, mean prompt length."
    from movierec.model import load_adapter, model_input
    from movierec.prompts import read_examples
    from movierec.score import score_prompts
    test = read_examples(data, "test")
    if limit: test = test.head(limit)
    model, tok = load_adapter(adapter, device=device)
    lengths = [len(x) for x in tok([model_input(tok, p) for p in test.prompt], add_special_tokens=False)["input_ids"]]
    if torch.cuda.is_available(): torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pred = score_prompts(model, tok, test.prompt.tolist(), batch_size=batch_size, progress=False)
    if torch.cuda.is_available(): torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rmse = float(np.sqrt(np.mean((pred.pred.to_numpy() - test.rating.to_numpy()) ** 2)))
    res = {"tokens_per_s": round(sum(lengths) / wall, 1), "wall_s": round(wall, 2), "examples": len(test), "rmse": round(rmse, 4),
           "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}
    print(f"\n== scoring {len(test)} test ratings: {res}", flush=True)
    return res, float(np.mean(lengths)), model


def export_hf_folder(base_model, folder: Path) -> Path:
    "The base as a Hugging Face folder (safetensors + tokenizer), which bitsandbytes can load in 4 bits."
    from movierec.model import load_base
    model, tok = load_base(base_model, device="cpu")
    model.save_pretrained(folder); tok.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check", help="folder for the adapters and gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="the same steps, tiny, on the CPU (checks the script, not the GPU)")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per GPU per step for the bf16 run")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, when the table does not know it")
    args = ap.parse_args(argv)

    from movierec.core import MovierecError
    from movierec.prompts import PrepareConfig, prepare
    from movierec.train import TrainConfig
    if not args.smoke and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU; run bench/gpu_check.sh, "
              "or --smoke to check the script on the CPU.", file=sys.stderr)
        return 3
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    gpus = 0 if args.smoke else torch.cuda.device_count()
    peak = args.peak_tflops or (None if args.smoke else peak_tflops(name))
    print(f"device: {name}, {gpus} GPU(s); torch {torch.__version__}, CUDA {torch.version.cuda}; dense bf16 peak "
          f"{peak or 'unknown (pass --peak-tflops)'} TFLOPS", flush=True)
    report = {"device": name, "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda, "peak_bf16_tflops": peak,
              "smoke": args.smoke, "rows": [], "notes": []}

    # the data: ML-100K as `movierec data` prepares it
    data = out / "data"
    prepare(PrepareConfig(dataset="ml-100k", **({"template": "compact"} if args.smoke else {})), data)  # --smoke: no classic fits to wait for
    base = "tiny-llama" if args.smoke else None   # None: SmolLM2-135M-Instruct, the default GGUF
    bs = 8 if args.smoke else args.batch_size
    common = dict(base_model=base, device=device, bf16="auto" if not args.smoke else False, seed=0)

    # 1. bf16 LoRA on every training example
    full = TrainConfig(**common, batch_size=bs, train_examples=64 if args.smoke else None, val_examples=16 if args.smoke else 500,
                       save_steps=4 if args.smoke else 200, logging_steps=2 if args.smoke else 25, learning_rate=2e-4 if not args.smoke else 2e-2)
    res = train_step(data, out / "bf16", full, "1. LoRA, bf16, all training examples")
    # 2. every test rating
    scored, seq_len_test, model = score_step(data, out / "bf16", 16 if args.smoke else 256, 48 if args.smoke else None, device)
    shape = model_shape(model)
    del model
    seq_len_train = res["tokens_seen"] / max(1, res["examples_seen"])
    report["model"] = shape
    report["rows"].append(row("train bf16, all examples", res, shape, seq_len_train, True, peak, 1))
    report["rows"].append(row("score every test rating", scored, shape, seq_len_test, False, peak, 1))

    # 3. a few steps in 4 bits
    hf = export_hf_folder(base, out / "base-hf")
    qlora = TrainConfig(**{**common, "base_model": str(hf)}, load_in_4bit=not args.smoke, batch_size=bs, max_steps=4 if args.smoke else 30,
                        train_examples=64 if args.smoke else 4000, val_examples=0, save_steps=4 if args.smoke else 30,
                        logging_steps=2 if args.smoke else 10)
    if args.smoke: report["notes"].append("4-bit step run in full precision: bitsandbytes needs CUDA")
    try:
        res4 = train_step(data, out / "qlora", qlora, "3. QLoRA, 4-bit base" + (" (full precision in --smoke)" if args.smoke else ""))
        report["rows"].append(row("train 4-bit (QLoRA), a few steps", res4, shape, res4["tokens_seen"] / max(1, res4["examples_seen"]),
                                  True, peak, 1))
    except MovierecError as e:
        print(f"   4-bit step failed: {e}", flush=True)
        report["notes"].append(f"4-bit step failed: {e}")

    # 4. two processes against one, same global batch
    if args.smoke or gpus >= 2:
        steps = 6 if args.smoke else 100
        same = dict(**common, max_steps=steps, train_examples=128 if args.smoke else None, val_examples=0, save_steps=steps,
                    logging_steps=2 if args.smoke else 25, group_by_length=True)
        one = train_step(data, out / "one", TrainConfig(**same, batch_size=2 * bs), "4a. one process, batch 2b")
        two = train_step(data, out / "two", TrainConfig(**same, batch_size=bs, nproc=2), "4b. two processes, batch b each")
        for label, r, n in (("train 1 process, batch 2b", one, 1), ("train 2 processes, batch b each", two, 2)):
            report["rows"].append(row(label, r, shape, r["tokens_seen"] / max(1, r["examples_seen"]), True, peak, n))
        report["two_process_speedup"] = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
    else:
        report["notes"].append(f"2-process training skipped: {gpus} GPU(s)")

    table = pd.DataFrame(report["rows"])
    print("\n" + table.to_string(index=False))
    for note in report["notes"]: print(f"note: {note}")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten to {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
