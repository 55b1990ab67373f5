"""Data parallel on the CPU: two gloo processes train the adapter one process trains, and score what one process scores.

`movierec train --nproc 2 --batch-size 2` launches two processes under torchrun; the adapter they write must
equal, within float tolerance, the one a single process writes with `--batch-size 4` (the same global batch,
the same examples in every step), and differ from a single process with batch 2 by far more than that tolerance.
512 training examples make the length-grouped batches depend on the batch size (mega-batches of 50 batches),
so grouping per process instead of over the global batch would show.
A two-process run stopped after its first checkpoint and resumed reaches the same adapter. Scoring under
torchrun splits the batches between the processes and gathers a table equal, to the last bit, to one process's.
Everything runs on `tiny-llama` with real ML-100K prompts; each launch costs a few seconds of process start-up.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from movierec.model import TINY
from movierec.train import TrainConfig, train

ENV = {**os.environ, "MOVIEREC_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# 8 steps with checkpoints at 4 and 8, validation at both; no dropout and fp32, so that runs can agree to float tolerance
KNOBS = dict(base_model=TINY, max_steps=8, save_steps=4, val_examples=16, learning_rate=0.02, logging_steps=1,
             lora_dropout=0.0, bf16=False, save_total_limit=3)
TOLERANCE = 2e-5  # on adapter weights of magnitude ~0.05 (B) and ~0.2 (A)
# Adam divides each update by the root of the squared gradient: where a gradient element is float noise around
# zero, that noise becomes a step of up to lr * ~0.02. So a few elements in a thousand may differ by up to NOISE (1.1e-3
# measured on hybrid_lean prompts, 1e-3 on hybrid_short's); the rest agree to TOLERANCE. Another global batch moves
# weights by about 0.1 (0.12 measured), far above NOISE.
NOISE = 2e-3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ml100k_prepared) -> Path:
    "512 training, 16 validation and 29 test examples of real ML-100K prompts, in the layout `prepare` writes."
    d = ml100k_prepared
    small = tmp_path_factory.mktemp("small")
    for split, n in (("train", 512), ("val", 16), ("test", 29)):
        d[split].sample(n, random_state=0).reset_index(drop=True).to_parquet(small / f"{split}.parquet")
    return small


def cli_train(data, out, *extra, **knobs) -> dict:
    "`movierec train` as a user runs it, with `KNOBS` (`knobs` override them); its train.json."
    flags = [a for k, v in {**KNOBS, **knobs}.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    res = subprocess.run([sys.executable, "-m", "movierec.cli", "train", "--data", str(data), "--out", str(out), *flags, *extra],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((Path(out) / "train.json").read_text())


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory) -> Path:
    "The reference: one process, batch 4."
    out = tmp_path_factory.mktemp("one") / "adapter"
    train(prepared, out, TrainConfig(**KNOBS, batch_size=4), progress=False)
    return out


def adapter_diff(a: Path, b: Path) -> tuple[float, float]:
    "The share of adapter weights that agree within TOLERANCE, and the largest difference."
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    d = np.concatenate([(x[k] - y[k]).abs().flatten().numpy() for k in sorted(x)])
    return float((d <= TOLERANCE).mean()), float(d.max())


def assert_same_adapter(a: Path, b: Path) -> None:
    agree, largest = adapter_diff(a, b)
    assert agree > 0.998 and largest < NOISE, (agree, largest)


def test_two_processes_train_the_adapter_of_one(prepared, one_process, tmp_path):
    ddp = cli_train(prepared, tmp_path / "ddp", nproc=2, batch_size=2)
    one = json.loads((one_process / "train.json").read_text())
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["steps"] == one["steps"] == 8
    # the same examples, step by step: the counts summed over the processes equal the single process's
    for k in ("epochs", "examples_seen", "loss_tokens", "tokens_seen"): assert ddp[k] == one[k], k
    assert one["examples_seen"] == 32
    b = load_file(one_process / "adapter_model.safetensors")
    assert min(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 1e-2   # trained: B started at zero
    assert_same_adapter(one_process, tmp_path / "ddp")
    np.testing.assert_allclose(pd.read_csv(tmp_path / "ddp" / "loss.csv").loss.dropna(),
                               pd.read_csv(one_process / "loss.csv").loss.dropna(), rtol=1e-5)
    assert ddp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)   # the training losses' tolerance
    # written once: one adapter folder, checkpoints by the first process only (each process keeps its RNG state there)
    ckpt = tmp_path / "ddp" / "checkpoints" / "checkpoint-8"
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not list((tmp_path / "ddp").glob(".save.*"))
    # the tolerance means something: one process with batch 2 (another global batch) trains another adapter
    train(prepared, tmp_path / "half", TrainConfig(**KNOBS, batch_size=2), progress=False)
    agree, largest = adapter_diff(one_process, tmp_path / "half")
    assert agree < 0.5 and largest > 10 * NOISE, (agree, largest)


STOP_AFTER_FIRST_CHECKPOINT = """
import sys
from transformers import TrainerCallback
from movierec.train import TrainConfig, train

class StopAt4(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 4: control.should_training_stop = True

train(sys.argv[1], sys.argv[2], TrainConfig(**{knobs!r}), callbacks=[StopAt4()], progress=False)
"""


def test_two_processes_resume(prepared, one_process, tmp_path):
    script, out = tmp_path / "stop.py", tmp_path / "ddp"
    script.write_text(STOP_AFTER_FIRST_CHECKPOINT.format(knobs={**KNOBS, "nproc": 2, "batch_size": 2}))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                          str(prepared), str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    resumed = cli_train(prepared, out, "--resume", nproc=2, batch_size=2)
    assert resumed["resumed_from"] == "checkpoint-4" and resumed["steps"] == 8
    assert resumed["examples_seen"] == json.loads((one_process / "train.json").read_text())["examples_seen"]
    assert_same_adapter(one_process, out)


SCORE = """
import json, sys
import pandas as pd
import torch.distributed as dist
from movierec.model import smollm2_tokenizer, tiny_llama
from movierec.score import join_processes, score_candidates, score_prompts

rank, world = join_processes("cpu")
out = sys.argv[2]
tok, model = smollm2_tokenizer(), tiny_llama()
calls = []
model.register_forward_hook(lambda m, args, kw, res: calls.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
prompts = pd.read_parquet(sys.argv[1] + "/test.parquet").prompt.tolist()
table = score_prompts(model, tok, prompts, batch_size=4, progress=False, autocast=False)
n_prompts = len(calls)
profile = "The user liked Heat, Casino and Fargo; disliked Grease and Cats. Preferred genres: Crime, Drama.\\n"
cands = score_candidates(model, tok, [profile + f"Movie: {{t}}." for t in "ABCDEFGHIJK"], batch_size=2, autocast=False)
json.dump({{"prompt_passes": calls[:n_prompts], "candidate_passes": calls[n_prompts:]}}, open(f"{{out}}/calls-{{rank}}.json", "w"))
if rank == 0:
    table.to_parquet(f"{{out}}/prompts.parquet"); cands.to_parquet(f"{{out}}/candidates.parquet")
if world > 1: dist.destroy_process_group()
"""


def test_scoring_on_two_processes_equals_one(prepared, tmp_path):
    script = tmp_path / "score.py"
    script.write_text(SCORE.format())
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), str(script),
                              str(prepared), str(tmp_path / str(n))], env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("prompts", "candidates"):
        one, two = pd.read_parquet(tmp_path / "1" / f"{name}.parquet"), pd.read_parquet(tmp_path / "2" / f"{name}.parquet")
        pd.testing.assert_frame_equal(two, one, check_exact=True)
    assert len(one) == 11 and one.pred.between(1, 5).all()
    # each process scored its share: 29 prompts in 8 batches of 4 (the last of 1), dealt round-robin
    calls = [json.loads((tmp_path / "2" / f"calls-{r}.json").read_text()) for r in (0, 1)]
    assert sum(map(sum, (c["prompt_passes"] for c in calls))) == 29 and [len(c["prompt_passes"]) for c in calls] == [4, 4]
    single = json.loads((tmp_path / "1" / "calls-0.json").read_text())
    assert len(single["prompt_passes"]) == 8
    # candidates: each process runs the shared prefix once, then its share of the 6 batches of the 11 tails
    assert [c["candidate_passes"] for c in calls] == [[1, 2, 2, 2], [1, 2, 2, 1]] and single["candidate_passes"][0] == 1


NO_GPU = "#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\" >&2\nexit 9\n"


def test_gpu_check_refuses_without_a_gpu(tmp_path, project_root):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(NO_GPU)
    (fake / "nvidia-smi").chmod(0o755)
    env = {**ENV, "PATH": f"{fake}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv")}   # the same answer on a GPU machine
    res = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=project_root, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert "no CUDA GPU here" in res.stderr and "nothing was installed or run" in res.stderr and "--smoke" in res.stderr
    assert not (tmp_path / "venv").exists()


def test_gpu_check_peaks_and_flops(project_root):
    sys.path.insert(0, str(project_root / "bench"))
    try: import gpu_check
    finally: sys.path.remove(str(project_root / "bench"))
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0, "NVIDIA H200": 989.4,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA A10": 125.0, "NVIDIA L40S": 362.0,
             "NVIDIA L4": 121.0, "Tesla T4": None}
    assert {n: gpu_check.peak_tflops(n) for n in names} == names
    smol = {"n_nonembed": 106_203_456, "layers": 30, "hidden": 576}   # SmolLM2-135M: 134,515,008 less the 49,152 x 576 embedding
    assert gpu_check.flops_per_token(smol, 200, training=True) == 4 * 106_203_456 + 12 * 30 * 576 * 200
    assert gpu_check.mfu(100_000, 1e9, 989.4) == pytest.approx(1e14 / 989.4e12)


def test_gpu_check_smoke_on_the_cpu(tmp_path, project_root):
    "Every step of the GPU check, tiny, on the CPU: the script runs through, two gloo processes included."
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=project_root,
                         env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["step"] for r in report["rows"]] == ["train bf16, all examples", "score every test rating", "train 4-bit (QLoRA), a few steps",
                                                   "train 1 process, batch 2b", "train 2 processes, batch b each"]
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] is None for r in report["rows"])  # no peak for a CPU
    assert report["model"]["layers"] == 2 and report["rows"][1]["examples"] == 48 and 1 <= report["rows"][1]["rmse"] < 4
    assert "tokens_per_s" in res.stdout and "4-bit step run in full precision" in res.stdout
