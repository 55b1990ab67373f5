"""Rating predictions per second from Ollama: our API path against the seed's way, same model, same prompts, one run.

- API: `serve.ollama_predict`: one generated token per prompt with `top_logprobs=20`, raw text, concurrent requests.
- seed: one `ollama run NAME "PROMPT"` process per example, free generation (at most --seed-new-tokens), the first
  digit 1-5 found by a regex.
- `ollama run` on the deployed model: the same CLI, on the model `deploy` creates, whose template ends with the answer
  prefix and which answers one token, the most likely rating.

Both talk to the same private `ollama serve` with the model already loaded (a warm-up request first).

    flock /tmp/movierec-cpu.lock .venv/bin/python bench/ollama.py --adapter /tmp/train_run [--data DIR] [-n 50]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's folder comes first on sys.path and its name would hide the `ollama` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from movierec.export import base_gguf_of, chat_template_of, export_adapter_gguf, export_base_gguf
from movierec.model import load_tokenizer, read_adapter_meta
from movierec.ollama_server import OllamaServer
from movierec.prompts import PrepareConfig, prepare, read_examples
from movierec.serve import create_model, ollama_predict

RATING = re.compile(r"[1-5]")


def test_prompts(data: str | None, n: int, seed: int) -> list[str]:
    "n test prompts: from a prepared folder, else ML-100K prepared into a temporary folder."
    if data is None:
        data = tempfile.mkdtemp(prefix="movierec-bench-data-")
        prepare(PrepareConfig(dataset="ml-100k"), data)
    test = read_examples(data, "test")
    return test.sample(min(n, len(test)), random_state=seed).prompt.tolist()


def seed_way(binary: Path, host: str, name: str, prompts: list[str], timeout: float) -> tuple[list, float]:
    "One `ollama run` process per prompt (an argv list: no shell), first digit of the free-form answer."
    env = {**os.environ, "OLLAMA_HOST": host.removeprefix("http://"), "NO_COLOR": "1"}
    out, t0 = [], time.perf_counter()
    for p in prompts:
        r = subprocess.run([str(binary), "run", "--nowordwrap", name, p], env=env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        m = RATING.search(r.stdout)
        out.append((int(m.group()) if m else None, len(r.stdout)))
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="a PEFT adapter folder written by `movierec train`")
    ap.add_argument("--data", help="a prepared data folder (`movierec data --out`); default: ML-100K prepared now")
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed to one `ollama run`")
    ap.add_argument("--seed-new-tokens", type=int, default=64, help="num_predict of the seed's model (its response held the "
                    "rating, a reasoning and a confidence line; bench/score.py uses the same bound)")
    args = ap.parse_args(argv)

    prompts = test_prompts(args.data, args.n, args.seed)
    tok = load_tokenizer(read_adapter_meta(args.adapter).get("base_model"))
    with tempfile.TemporaryDirectory() as d, OllamaServer(num_parallel=args.concurrency) as srv:
        d = Path(d)
        base = export_base_gguf(base_gguf_of(args.adapter), d / "base-f16.gguf")
        adapter = export_adapter_gguf(args.adapter, d / "adapter.gguf")
        client = srv.client()
        create_model(client, "movierec-bench", base, adapter, overwrite=True)
        # the seed's model: the same files, free generation bounded at --seed-new-tokens (our adapter was trained on the
        # rating token only, so it may never emit <|im_end|>, and Ollama's context shift would let it talk forever)
        template, stops = chat_template_of(base, answer_prefix="")   # the base's chat template alone, as the seed served it
        create_model(client, "movierec-bench-seed", base, adapter, overwrite=True, template=template,
                     parameters={"temperature": 0, "stop": stops, "num_predict": args.seed_new_tokens})
        ollama_predict(client, "movierec-bench", prompts[:1], tok)   # load the model once, for both ways (same blobs)

        t0 = time.perf_counter()
        api = ollama_predict(client, "movierec-bench", prompts, tok, concurrency=args.concurrency)
        t_api = time.perf_counter() - t0
        seed_way(srv.binary, srv.host, "movierec-bench-seed", prompts[:1], args.timeout)   # warm, like the API's
        seed, t_seed = seed_way(srv.binary, srv.host, "movierec-bench-seed", prompts, args.timeout)
        served, t_served = seed_way(srv.binary, srv.host, "movierec-bench", prompts, args.timeout)

    n = len(prompts)
    failures = sum(r is None for r, _ in seed)
    agree = sum(r == a for (r, _), a in zip(seed, api.argmax) if r is not None)
    print(f"Ollama {srv.version}, {n} ML-100K test prompts, adapter {args.adapter}, F16 base, "
          f"{os.cpu_count()} CPUs, concurrency {args.concurrency}, seed's num_predict {args.seed_new_tokens}")
    print(f"{'way':<44}{'seconds':>9}{'preds/s':>9}{'failures':>10}")
    print(f"{'API: 1 token, top_logprobs=20, concurrent':<44}{t_api:>9.1f}{n / t_api:>9.2f}{int((api.argmax == 0).sum()):>10}")
    print(f"{'seed: `ollama run` per example + regex':<44}{t_seed:>9.1f}{n / t_seed:>9.2f}{failures:>10}")
    served_failures = sum(r is None for r, _ in served)
    print(f"{'`ollama run` on the deployed model':<44}{t_served:>9.1f}{n / t_served:>9.2f}{served_failures:>10}")
    print(f"ratio (API / seed): {t_seed / t_api:.1f}x   (goal >= 50x)")
    print(f"seed answers: mean {sum(c for _, c in seed) / n:.0f} characters; its digit equals the API's argmax "
          f"in {agree}/{n - failures} parsed answers")
    print(f"deployed model's answers: mean {sum(c for _, c in served) / n:.1f} characters; equal to the API's argmax in "
          f"{sum(r == a for (r, _), a in zip(served, api.argmax))}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
