"""Serving any base: a tiny llama GGUF written here with a Llama 3 chat template deploys, and Ollama's CLI and API
answer with the rating that PyTorch's scoring path predicts."""
import json
import os
import subprocess

import numpy as np
import pytest

from movierec.export import random_adapter

# Llama 3's chat template: header tokens, `<|eot_id|>` ends a turn, the BOS rendered by the template
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
                "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
PROMPTS = ["Predict the user's rating (1-5) of the movie.\nUser: 20 ratings, mean 3.1\nMovie: Heat (1995); Action; mean 3.9",
           "Rate Toy Story (1995) from 1 to 5.", 'A title with "quotes", $(metacharacters) and {{ .Prompt }}: rate it.']


def rating_llama(tokenizer, seed: int = 0):
    "A random two-layer llama (SmolLM2's vocabulary) whose next token after any text is mostly a digit 1-5, like a rater's."
    import torch
    from movierec.model import tiny_llama
    m = tiny_llama(tokenizer, seed=seed, tie_word_embeddings=False)
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    with torch.no_grad():   # every position carries a constant feature that only the digits' output rows read
        m.model.embed_tokens.weight[:, 0] += 6.0
        m.lm_head.weight[digits, 0] += 10.0
    return m


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    "A GGUF base in Llama 3's chat format whose runner adds the BOS itself, and a random adapter trained on it."
    from movierec.export import write_llama_gguf
    from movierec.model import smollm2_tokenizer
    d = tmp_path_factory.mktemp("llama3")
    base = write_llama_gguf(rating_llama(smollm2_tokenizer()), d / "rating-llama3-bos.gguf", chat_template=LLAMA3_JINJA, add_bos=True)
    return base, random_adapter(d / "adapter", base, r=4, alpha=8, b_std=0.2)


@pytest.fixture(scope="module")
def deployed_llama3(llama3, tmp_path_factory, ollama_server):
    from movierec.deploy import DeployConfig, deploy
    base, adapter = llama3
    out = tmp_path_factory.mktemp("llama3-gguf")
    res = deploy(adapter, out, DeployConfig(model_name="movierec-llama3", ollama_host=ollama_server.host), parity_prompts=PROMPTS,
                 concurrency=2)
    yield res, adapter, out
    for m in res["models"].values(): ollama_server.client().delete(m)


def _cli(server):
    "The official `ollama` CLI (the binary `ensure_ollama` finds) pointed at `server`, run without a shell."
    from movierec.assets import ensure_ollama
    binary, env = str(ensure_ollama(build=False)), {**os.environ, "OLLAMA_HOST": server.host.removeprefix("http://"), "NO_COLOR": "1"}
    def run(*args, cwd=None):
        r = subprocess.run([binary, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        return r.stdout
    return run


@pytest.mark.slow
def test_a_llama3_base_deploys_and_matches_pytorch(deployed_llama3):
    "Export, create (adapter and merged) and predict on a non-ChatML base: the template is Llama 3's, the ratings PyTorch's."
    res, adapter, out = deployed_llama3
    assert res["models"] == {"adapter": "movierec-llama3", "merged": "movierec-llama3-merged"} and res["served_from"] == "adapter"
    template = res["settings"]["template"]
    assert "<|start_header_id|>user<|end_header_id|>" in template and "<|im_start|>user" not in template
    assert template.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nRating Prediction: ")
    assert not template.startswith("<|im_start|>")      # the runner adds the BOS itself (add_bos_token)
    assert res["settings"]["parameters"]["stop"] == ["<|eot_id|>", "<|im_end|>"]
    assert json.loads((out / "deploy.json").read_text())["settings"] == res["settings"]
    assert 'PARAMETER stop "<|eot_id|>"' in (out / "Modelfile").read_text()
    for kind in ("adapter", "merged"):
        p = res["parity"][kind]
        assert p["n"] == len(PROMPTS) and p["mean_abs_diff"] <= 0.05 and p["argmax_agreement"] == 1, (kind, p)


@pytest.mark.slow
def test_llama3_ollama_reads_the_tokens_pytorch_reads(deployed_llama3, ollama_server):
    "Raw text, /api/chat and /api/generate give PyTorch's next-token log-probabilities: one BOS, the same template."
    import torch
    from movierec.model import load_adapter, model_input
    from movierec.serve import served_text
    res, adapter, out = deployed_llama3
    model, tok = load_adapter(adapter)
    client, opts = ollama_server.client(), {"temperature": 0, "num_predict": 1, "num_ctx": res["num_ctx"]}
    for prompt in PROMPTS:
        ids = tok(model_input(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0, 0] == tok.bos_token_id and (ids[0] == tok.bos_token_id).sum() == 1
        with torch.no_grad(): top = model(ids).logits[0, -1].float().log_softmax(-1).topk(5)
        want = [tok.convert_ids_to_tokens(int(i)) for i in top.indices]
        raw = client.generate(model="movierec-llama3", prompt=served_text(tok, prompt), raw=True, logprobs=True, top_logprobs=5, options=opts)
        chat = client.chat(model="movierec-llama3", messages=[{"role": "user", "content": prompt}], logprobs=True, top_logprobs=5)
        gen = client.generate(model="movierec-llama3", prompt=prompt, logprobs=True, top_logprobs=5)
        for r in (raw, chat, gen):
            got = r.logprobs[0].top_logprobs
            assert r.prompt_eval_count == ids.shape[1]
            assert [t.token for t in got] == want
            np.testing.assert_allclose([t.logprob for t in got], top.values.numpy(), atol=0.02)
        assert chat.message.content == gen.response == want[0] and want[0] in "12345"
        # the text as PyTorch reads it, sent raw, would carry two BOS: the runner adds one
        doubled = client.generate(model="movierec-llama3", prompt=model_input(tok, prompt), raw=True, options=opts)
        assert doubled.prompt_eval_count == ids.shape[1] + 1


@pytest.mark.slow
def test_llama3_cli_answers_with_the_rating(deployed_llama3, ollama_server):
    "`ollama create -f Modelfile` then `ollama run NAME PROMPT`: the answer is the rating PyTorch's scoring path gives, alone."
    from movierec.model import load_adapter
    from movierec.score import score_prompts
    res, adapter, out = deployed_llama3
    cli = _cli(ollama_server)
    cli("create", "movierec-llama3-cli", "-f", "Modelfile", cwd=out)
    try: answers = [cli("run", "--nowordwrap", "movierec-llama3-cli", p).strip() for p in PROMPTS]
    finally: ollama_server.client().delete("movierec-llama3-cli")
    model, tok = load_adapter(adapter)
    torch_preds = score_prompts(model, tok, PROMPTS, progress=False, autocast=False)
    assert answers == [str(int(a)) for a in torch_preds.argmax], answers
