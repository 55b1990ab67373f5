"""LoRA training: loss falls, labels mask the prompt, resume after SIGKILL, damaged checkpoints, DDP, SmolLM2.

Everything but the last test runs on `tiny-llama` (a 2-layer random Llama with SmolLM2's vocabulary) and
real ML-100K prompts from `movierec.prompts.prepare`, so the file takes about a minute.
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

from movierec.core import MovierecError
from movierec.model import RATING_PREFIX, TINY, model_input, rating_token_ids, smollm2_tokenizer, tiny_llama
from movierec.train import Collator, TrainConfig, answer_loss, tokenize_examples, train

HELPER = Path(__file__).with_name("train_helper.py")
ENV = {**os.environ, "MOVIEREC_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ml100k_dir) -> Path:
    "128 training and 16 validation examples of real ML-100K prompts, in the layout `prepare` writes."
    from movierec.prompts import load_prepared, prepare
    full = tmp_path_factory.mktemp("ml100k")
    prepare(ml100k_dir, full)
    d = load_prepared(full)
    small = tmp_path_factory.mktemp("small")
    d["train"].sample(128, random_state=0).reset_index(drop=True).to_parquet(small / "train.parquet")
    d["val"].sample(16, random_state=0).reset_index(drop=True).to_parquet(small / "val.parquet")
    return small


def run_helper(*args, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(HELPER), *map(str, args)], env={**ENV, **(env or {})},
                         capture_output=True, text=True, timeout=300, **kw)
    if check: assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def ref_run(prepared, tmp_path_factory) -> Path:
    "An uninterrupted 12-step run (checkpoints at 4, 8, 12; no validation, so the final adapter is step 12's)."
    out = tmp_path_factory.mktemp("ref") / "adapter"
    run_helper(prepared, out, "--max-steps", 12, "--save-steps", 4, "--val", 0)
    return out


def test_loss_falls_on_real_prompts(prepared, tmp_path):
    cfg = TrainConfig(learning_rate=2e-2, max_steps=16, save_steps=8, logging_steps=2, max_val_examples=16, progress_bar=False)
    res = train(prepared, tmp_path / "a", base_model=TINY, config=cfg)
    log = pd.read_csv(tmp_path / "a" / "loss.csv")
    first, last = log.loss.dropna().iloc[0], log.loss.dropna().iloc[-3:].mean()
    assert last < first - 2, log
    assert res["val_loss"] < first - 2 and np.isfinite(res["val_loss"])
    assert res["loss_tokens"] == res["examples_seen"] == 16 * 8       # the rating objective: one token per example
    assert res["tokens_seen"] > 100 * res["loss_tokens"]              # real prompts: ~220 tokens each, no padding counted
    assert res["max_length"] < 400 and (tmp_path / "a" / "loss.png").stat().st_size > 1000
    meta = json.loads((tmp_path / "a" / "movierec.json").read_text())
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


def test_resume_after_sigkill_matches_uninterrupted(prepared, ref_run, tmp_path):
    out = tmp_path / "adapter"
    proc = subprocess.Popen([sys.executable, str(HELPER), str(prepared), str(out), "--max-steps", "12", "--save-steps", "4", "--val", "0"],
                            env={**ENV, "MOVIEREC_STEP_DELAY": "0.5"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker, t0 = out / "checkpoints" / "checkpoint-8" / "movierec.json", time.time()
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
    res = json.loads(run_helper(prepared, out, "--max-steps", 12, "--save-steps", 4, "--val", 0, "--resume").stdout.strip().splitlines()[-1])
    assert res["resumed_from"] == "checkpoint-8" and res["steps"] == 12
    a, b = load_file(ref_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _resume(data, out, **kw):
    cfg = dict(learning_rate=2e-2, max_steps=12, save_steps=4, max_val_examples=0, save_total_limit=3, logging_steps=2, progress_bar=False)
    return train(data, out, base_model=TINY, config=TrainConfig(**{**cfg, **kw}), resume=True)


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
    with pytest.raises(MovierecError, match="belongs to another run.*rank=16 there, 8 here"): _resume(prepared, out, rank=8)
    with pytest.raises(MovierecError, match="objective='rating' there, 'response' here"): _resume(prepared, out, objective="response")
    with pytest.raises(MovierecError, match="data="): _resume(prepared, out, max_examples=64)
    # a checkpoint cut off while saving (no movierec.json, written last) is skipped: resume from the one before
    out = copy("interrupted")
    (out / "checkpoints" / "checkpoint-12" / "movierec.json").unlink()
    assert _resume(prepared, out)["resumed_from"] == "checkpoint-8"
    # not resuming into a folder with checkpoints is refused, not silently overwritten
    with pytest.raises(MovierecError, match="resume"):
        train(prepared, out, base_model=TINY, config=TrainConfig(max_steps=2, progress_bar=False))


def test_ddp_two_cpu_processes(prepared, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(HELPER), str(prepared), str(out), "--max-steps", "4", "--save-steps", "4", "--val", "16"]
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
    cfg = TrainConfig(max_steps=3, batch_size=4, max_examples=12, max_val_examples=8, save_steps=3, logging_steps=1, progress_bar=False)
    res = train(prepared, out, config=cfg)
    assert res["steps"] == 3 and res["trainable_params"] == 1_843_200 and np.isfinite(res["train_loss"])
    assert 0 < res["val_loss"] < 5 and res["tokens_per_s"] > 0 and res["peak_rss_mb"] > 500
    assert json.loads((out / "movierec.json").read_text())["base_model"] is None    # the default GGUF, portable
    model, tok = load_adapter(out, device="cpu")
    df = pd.read_parquet(prepared / "val.parquet").head(2)
    x = tok(model_input(tok, df.prompt[0]), return_tensors="pt")
    rid = rating_token_ids(tok)
    with torch.no_grad():
        tuned = model(**x, logits_to_keep=1).logits[0, -1, rid]
        with model.disable_adapter(): base = model(**x, logits_to_keep=1).logits[0, -1, rid]
    assert not torch.allclose(tuned, base) and (tuned - base).abs().max() < 5
