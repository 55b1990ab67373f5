"""Quantized serving: what Q8_0 and Q4_K_M cost in accuracy and buy in size and speed, next to the F16 model and PyTorch.

Deploys a trained adapter into a private Ollama (`deploy.deploy` with `quantize`: the base + adapter, the merged F16 model,
and Ollama's quantized copies of it), checks every model against the PyTorch adapter on the same n test examples with their
true ratings, and prints the trade-off table from the resulting deploy.json:

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/quantize.py --adapter RUN/adapter --data RUN/data [-n 200] [--out DIR]
    .venv/bin/python bench/quantize.py --deploy-json RUN/gguf/deploy.json     # the table of an earlier deploy

Columns: the model's size on the server; ratings per second through Ollama's API (one token, top_logprobs, `--concurrency`
requests at a time); RMSE on the true ratings and its difference with PyTorch's RMSE on the same ratings (with a paired
bootstrap 95% interval); the mean |difference| of expected ratings with PyTorch's and how often the most likely rating agrees.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# run as a script, this file's folder comes first on sys.path and bench/ollama.py would hide the `ollama` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pandas as pd  # noqa: E402

from movierec.deploy import DeployConfig, deploy  # noqa: E402
from movierec.prompts import read_examples  # noqa: E402


def trade_off_table(info: dict) -> pd.DataFrame:
    "One row per served variant of a deploy.json: size, creation time, speed, RMSE next to PyTorch's, agreement."
    rows = {}
    for kind, model in info["models"].items():
        v, p = info["variants"][kind], info["parity"].get(kind, {})
        lo, hi = p.get("rmse_diff_ci95", [float("nan")] * 2)
        rows[kind] = {"model": model, "quantization": v["quantization"], "MB": v["bytes"] / 1e6, "create s": v["create_s"],
                      "ratings/s": p.get("ollama_preds_per_s"), "rmse": p.get("rmse"), "rmse - pytorch": p.get("rmse_diff"),
                      "95% interval": f"[{lo:+.3f}, {hi:+.3f}]", "mean |diff|": p.get("mean_abs_diff"),
                      "argmax agreement": p.get("argmax_agreement")}
    return pd.DataFrame.from_dict(rows, orient="index")


def print_table(info: dict) -> None:
    table = trade_off_table(info)
    p = next(iter(info["parity"].values()), {})
    print(f"Ollama {info.get('ollama_version')}, {os.cpu_count()} CPUs, adapter {info['adapter_dir']}, "
          f"{p.get('n', 0)} test ratings; PyTorch (float32): RMSE {p.get('rmse_torch', float('nan')):.4f}, "
          f"{p.get('torch_preds_per_s', float('nan')):.2f} ratings/s")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", help="a PEFT adapter folder written by `movierec train`")
    ap.add_argument("--data", help="its prepared data folder (test examples with their ratings)")
    ap.add_argument("--deploy-json", help="print the table of an earlier deploy instead")
    ap.add_argument("-n", type=int, default=200, help="test examples scored by every model")
    ap.add_argument("--quantize", nargs="+", default=["q8_0", "q4_K_M"])
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder for the GGUF files and deploy.json (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.deploy_json:
        print_table(json.loads(Path(args.deploy_json).read_text()))
        return 0
    if not (args.adapter and args.data): ap.error("pass --adapter and --data, or --deploy-json")
    test = read_examples(args.data, "test")
    targets = test.sample(min(args.n, len(test)), random_state=args.seed)[["prompt", "rating"]]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        info = deploy(args.adapter, out, DeployConfig(model_name="movierec-bench", quantize=args.quantize), parity_prompts=targets,
                      concurrency=args.concurrency)
        print_table(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
