"""LoRA training: loss falls, labels mask the prompt, resume after SIGKILL, damaged checkpoints, DDP, SmolLM2.

Everything but the last test runs on `tiny-llama` (a 2-layer random Llama with SmolLM2's vocabulary) and
real ML-100K prompts from `movierec.prompts.prepare`, so the file takes about a minute. Runs that need a
process of their own (killed mid-way, DDP) go through the real command line, `python -m movierec.cli train`.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from movierec.core import MOVIEREC_JSON, MovierecError
from movierec.model import TINY, model_input, rating_token_ids, smollm2_tokenizer, tiny_llama
from movierec.prompts import ENJOY_PREFIX, ENJOY_SPLIT, RATING_PREFIX
from movierec.train import Collator, TrainConfig, answer_loss, tokenize_examples, train

ENV = {**os.environ, "MOVIEREC_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
# the tiny runs' knobs: 12 steps of 8 with checkpoints at 4, 8, 12 and no validation (the final adapter is step 12's)
TINY_RUN = dict(base_model=TINY, max_steps=12, save_steps=4, val_examples=0, learning_rate=0.02, batch_size=8,
                save_total_limit=3, logging_steps=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ml100k_prepared) -> Path:
    "128 training and 16 validation examples of real ML-100K prompts, in the layout `prepare` writes."
    d = ml100k_prepared
    small = tmp_path_factory.mktemp("small")
    d["train"].sample(128, random_state=0).reset_index(drop=True).to_parquet(small / "train.parquet")
    d["val"].sample(16, random_state=0).reset_index(drop=True).to_parquet(small / "val.parquet")
    return small


def cli_train_args(data, out, *extra, **knobs) -> list[str]:
    "`movierec train` on `data` into `out` with the tiny runs' knobs (`knobs` override them), as command-line arguments."
    flags = [a for k, v in {**TINY_RUN, **knobs}.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return ["-m", "movierec.cli", "train", "--data", str(data), "--out", str(out), *flags, *extra]


def run_cli_train(data, out, *extra, **knobs) -> dict:
    "Run `python -m movierec.cli train` to the end; its `train.json`."
    res = subprocess.run([sys.executable, *cli_train_args(data, out, *extra, **knobs)], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((Path(out) / "train.json").read_text())


@pytest.fixture(scope="module")
def ref_run(prepared, tmp_path_factory) -> Path:
    "An uninterrupted 12-step run (checkpoints at 4, 8, 12; no validation, so the final adapter is step 12's)."
    out = tmp_path_factory.mktemp("ref") / "adapter"
    run_cli_train(prepared, out)
    return out


def test_loss_falls_on_real_prompts(prepared, tmp_path):
    cfg = TrainConfig(base_model=TINY, learning_rate=2e-2, max_steps=16, batch_size=8, save_steps=8, logging_steps=2, val_examples=16)
    res = train(prepared, tmp_path / "a", cfg, progress=False)
    log = pd.read_csv(tmp_path / "a" / "loss.csv")
    first, last = log.loss.dropna().iloc[0], log.loss.dropna().iloc[-3:].mean()
    assert last < first - 2, log
    assert res["val_loss"] < first - 2 and np.isfinite(res["val_loss"])
    assert res["loss_tokens"] == res["examples_seen"] == 16 * 8       # the rating objective: one token per example
    assert res["tokens_seen"] > 100 * res["loss_tokens"]              # real prompts: ~220 tokens each, no padding counted
    assert res["max_length"] < 400 and (tmp_path / "a" / "loss.png").stat().st_size > 1000
    meta = json.loads((tmp_path / "a" / MOVIEREC_JSON).read_text())
    assert meta["base_model"] == TINY and meta["objective"] == "rating" and meta["rating_prefix"] == RATING_PREFIX


def test_labels_mask_exactly_the_prompt(prepared):
    tok = smollm2_tokenizer()
    df = pd.read_parquet(prepared / "train.parquet").head(6)
    ids, n_in = tokenize_examples(tok, df.prompt, df.response)
    rows = [dict(input_ids=i, n_input=n, rating=r) for i, n, r in zip(ids, n_in, df.rating)]
    for k, (p, r) in enumerate(zip(df.prompt, df.response)):
        # input and answer are tokenized separately: the input ids are exactly what scorers and Ollama feed
        assert ids[k][:n_in[k]] == tok(model_input(tok, p), add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[k][n_in[k]:]) == r[len(RATING_PREFIX):] + tok.eos_token
    b = Collator(tok.pad_token_id, "response")(rows)
    width = b["input_ids"].shape[1]
    for k in range(len(rows)):
        pad, n = width - len(ids[k]), n_in[k]
        assert b["input_ids"][k, pad:].tolist() == ids[k] and (b["input_ids"][k, :pad] == tok.pad_token_id).all()
        assert (b["labels"][k, :pad + n] == -100).all()                         # padding and the whole prompt
        assert b["labels"][k, pad + n:].tolist() == ids[k][n:]                  # the whole answer, eos included
    b = Collator(tok.pad_token_id, "rating")(rows)
    assert ((b["labels"] != -100).sum(1) == 1).all()
    assert b["labels"][:, -1].tolist() == [rating_token_ids(tok)[int(r) - 1] for r in df.rating]


def test_answer_loss_equals_full_computation(prepared):
    tok, m = smollm2_tokenizer(), tiny_llama()
    df = pd.read_parquet(prepared / "train.parquet").head(5)
    ids, n_in = tokenize_examples(tok, df.prompt, df.response)
    rows = [dict(input_ids=i, n_input=n, rating=r) for i, n, r in zip(ids, n_in, df.rating)]
    rid = rating_token_ids(tok)
    with torch.no_grad():
        for obj in ("rating", "response"):
            b = Collator(tok.pad_token_id, obj)(rows)
            full = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"], labels=b["labels"]).loss
            assert torch.allclose(answer_loss(m, b, obj, rid), full, atol=1e-5)
        # expected_mse against the expected rating computed example by example, unpadded
        expected = []
        for i, n in zip(ids, n_in):
            p = m(input_ids=torch.tensor([i[:n]])).logits[0, -1, rid].softmax(-1)
            expected.append(float(p @ torch.arange(1.0, 6.0)))
        want = float(np.mean((np.array(expected) - df.rating.to_numpy()) ** 2))
        got = float(answer_loss(m, Collator(tok.pad_token_id, "expected_mse")(rows), "expected_mse", rid))
        assert abs(got - want) < 1e-4, (got, want)


def test_two_tasks_train_together(prepared, tmp_path):
    """Rating and Yes/No examples in one run (expected_mse): one answer token each, movierec.json names both tasks, and the
    Yes/No loss teaches what the scorer reads: every Yes/No example here answers Yes, so P(Yes) must rise towards 1."""
    from movierec.model import load_adapter
    from movierec.score import score_prompts
    tok = smollm2_tokenizer()
    data = tmp_path / "data"; shutil.copytree(prepared, data)
    train_df = pd.read_parquet(data / "train.parquet")
    train_df.assign(response=ENJOY_PREFIX + " Yes").to_parquet(data / f"{ENJOY_SPLIT}.parquet")
    cfg = TrainConfig(**{**TINY_RUN, "max_steps": 16, "objective": "expected_mse", "train_examples": 32, "enjoy_examples": 32})
    res = train(data, tmp_path / "a", cfg, progress=False)
    assert res["n_train"] == 64 and res["loss_tokens"] == res["examples_seen"] == 16 * 8
    assert json.loads((tmp_path / "a" / MOVIEREC_JSON).read_text())["tasks"] == ["rating", "enjoy"]
    prompts = train_df.prompt[:8].tolist()
    before = score_prompts(tiny_llama(), tok, prompts, progress=False, task="enjoy").p_enjoy.mean()
    trained, _ = load_adapter(tmp_path / "a", device="cpu")
    after = score_prompts(trained, tok, prompts, progress=False, task="enjoy").p_enjoy.mean()
    assert before < 0.9 < after, (before, after)  # measured: 0.77 before, 0.9997 after
    with pytest.raises(MovierecError, match="enjoy_negatives 1 or more"):
        train(prepared, tmp_path / "b", cfg, progress=False)


SLOW_RUN = """
import sys, time
from transformers import TrainerCallback
from movierec.train import TrainConfig, train

class SlowSteps(TrainerCallback):
    "Half a second after each step, so the test can kill the run between two checkpoints."
    def on_step_end(self, args, state, control, **kw): time.sleep(0.5)

train(sys.argv[1], sys.argv[2], TrainConfig(**{knobs!r}), callbacks=[SlowSteps()], progress=False)
"""


def test_resume_after_sigkill_matches_uninterrupted(prepared, ref_run, tmp_path):
    out, script = tmp_path / "adapter", tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN.format(knobs=TINY_RUN))
    proc = subprocess.Popen([sys.executable, str(script), str(prepared), str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker, t0 = out / "checkpoints" / "checkpoint-8" / MOVIEREC_JSON, time.time()
    try:
        while not marker.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() - t0 < 240, "no checkpoint-8 within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill(); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train.json").exists() and not (out / "checkpoints" / "checkpoint-12").exists()
    res = run_cli_train(prepared, out, "--resume")
    assert res["resumed_from"] == "checkpoint-8" and res["steps"] == 12
    a, b = load_file(ref_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _resume(data, out, **kw):
    return train(data, out, TrainConfig(**{**TINY_RUN, **kw}), resume=True, progress=False)


def test_damaged_or_mismatched_checkpoint_is_a_clear_error(prepared, ref_run, tmp_path):
    def copy(name):
        shutil.copytree(ref_run, tmp_path / name); return tmp_path / name
    out = copy("truncated")
    f = out / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(MovierecError, match=r"checkpoint-12 is damaged.*delete"): _resume(prepared, out)
    out = copy("state")
    (out / "checkpoints" / "checkpoint-12" / "trainer_state.json").write_text("{not json")
    with pytest.raises(MovierecError, match="checkpoint-12 is damaged"): _resume(prepared, out)
    out = copy("optimizer")
    (out / "checkpoints" / "checkpoint-12" / "optimizer.pt").write_bytes(b"\0" * 100)
    with pytest.raises(MovierecError, match="checkpoint-12 is damaged"): _resume(prepared, out)
    out = copy("rank")
    with pytest.raises(MovierecError, match="belongs to another run.*rank=16 there, 8 here"): _resume(prepared, out, lora_rank=8)
    with pytest.raises(MovierecError, match="objective='rating' there, 'response' here"): _resume(prepared, out, objective="response")
    with pytest.raises(MovierecError, match="data="): _resume(prepared, out, train_examples=64)
    # a checkpoint cut off while saving (no movierec.json, written last) is skipped: resume from the one before
    out = copy("interrupted")
    (out / "checkpoints" / "checkpoint-12" / MOVIEREC_JSON).unlink()
    assert _resume(prepared, out)["resumed_from"] == "checkpoint-8"
    # not resuming into a folder with checkpoints is refused, not silently overwritten
    with pytest.raises(MovierecError, match="resume"):
        train(prepared, out, TrainConfig(base_model=TINY, max_steps=2), progress=False)


def test_ddp_two_cpu_processes(prepared, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           *cli_train_args(prepared, out, max_steps=4, save_steps=4, val_examples=16)]
    res = subprocess.run(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    # 128 examples over 2 processes x 8 per step is 8 steps an epoch: 4 steps are half of it (a single process: a quarter)
    assert summary["epochs"] == 0.5 and np.isfinite(summary["val_loss"])
    assert (out / "adapter_model.safetensors").exists() and (out / "loss.csv").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.mark.slow
def test_smollm2_trains_a_few_steps(prepared, tmp_path):
    from movierec.model import load_adapter
    out = tmp_path / "smol"
    cfg = TrainConfig(max_steps=3, batch_size=4, train_examples=12, val_examples=8, save_steps=3, logging_steps=1)
    res = train(prepared, out, cfg, progress=False)
    assert res["steps"] == 3 and res["trainable_params"] == 1_843_200 and np.isfinite(res["train_loss"])
    assert 0 < res["val_loss"] < 5 and res["tokens_per_s"] > 0 and res["peak_rss_mb"] > 500
    assert json.loads((out / MOVIEREC_JSON).read_text())["base_model"] is None    # the default GGUF, portable
    model, tok = load_adapter(out, device="cpu")
    df = pd.read_parquet(prepared / "val.parquet").head(2)
    x = tok(model_input(tok, df.prompt[0]), return_tensors="pt")
    rid = rating_token_ids(tok)
    with torch.no_grad():
        tuned = model(**x, logits_to_keep=1).logits[0, -1, rid]
        with model.disable_adapter(): base = model(**x, logits_to_keep=1).logits[0, -1, rid]
    assert not torch.allclose(tuned, base) and (tuned - base).abs().max() < 5
