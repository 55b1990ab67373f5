"""Deploy to a real Ollama: GGUF export, creation, parity with PyTorch on ML-100K prompts, errors, shell safety."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from movierec.core import MovierecError
from movierec.export import random_adapter   # a PEFT LoRA with SmolLM2-135M's shapes and random non-zero B
from movierec.ollama_server import free_port

# A title that a shell would execute: it must reach the model as plain text and run nothing.
CANARY = Path("/tmp/movierec-deploy-pwned")
NASTY = f'"; rm -rf ~; echo " `touch {CANARY}` $(touch {CANARY}) | tee {CANARY} & ;'


@pytest.fixture(scope="module")
def ml_prompts(ml100k_dir):
    "Eight ML-100K test-time prompts for user 1, one of them about a movie retitled with shell metacharacters."
    from movierec.data import load_movielens, split_by_time
    from movierec.prompts import prompts_for_user
    ml = load_movielens(ml100k_dir)
    ml.movies.loc[ml.movies.movie_id == 50, "title"] = NASTY
    ratings = split_by_time(ml.ratings)
    history = ratings[ratings.split == "train"]
    movies = [50] + ratings[(ratings.user_id == 1) & (ratings.split == "test")].movie_id.head(7).tolist()
    prompts = prompts_for_user(ml, history, 1, movies, template="compact")  # parity, not the prompt, is under test
    assert NASTY in prompts[0]
    return prompts


@pytest.fixture(scope="module")
def ml_targets(ml100k_dir, ml_prompts):
    "The same prompts with user 1's true ratings of their movies."
    from movierec.data import load_movielens, split_by_time
    ml = load_movielens(ml100k_dir)
    ratings = split_by_time(ml.ratings)
    movies = [50] + ratings[(ratings.user_id == 1) & (ratings.split == "test")].movie_id.head(7).tolist()
    mine = ratings[ratings.user_id == 1].set_index("movie_id").rating
    return pd.DataFrame({"prompt": ml_prompts, "rating": mine.loc[movies].to_numpy()})


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, base_gguf, ml_targets, ollama_server):
    "`deploy` into the session's Ollama, two quantized copies, the parity check on the ML-100K prompts and their ratings."
    from movierec.deploy import DeployConfig, deploy
    tmp = tmp_path_factory.mktemp("deploy")
    adapter = random_adapter(tmp / "adapter", base_gguf)
    CANARY.unlink(missing_ok=True)
    cfg = DeployConfig(model_name="movierec-test", ollama_host=ollama_server.host, quantize=["q8_0", "q4_K_M"], serve_variant="q4_K_M")
    res = deploy(adapter, tmp / "gguf", cfg, parity_prompts=ml_targets, concurrency=2)
    yield res, adapter, tmp / "gguf"
    client = ollama_server.client()
    for m in res["models"].values():
        if any(x.model.split(":")[0] == m for x in client.list().models): client.delete(m)


@pytest.mark.slow
def test_deploy_exports_creates_and_matches_pytorch(deployed, ollama_server):
    from movierec.assets import sha256sum
    from movierec.export import gguf_info
    res, adapter, out = deployed
    on_disk = json.loads((out / "deploy.json").read_text())
    assert on_disk["parity"] == json.loads(json.dumps(res["parity"]))
    for kind, entry in res["files"].items():
        f = out / entry["path"]
        assert f.stat().st_size == entry["bytes"] and sha256sum(f) == entry["sha256"], kind
    assert gguf_info(out / "adapter.gguf")["type"] == "adapter" and gguf_info(out / "base-f16.gguf")["file_type"] == 1
    assert not list(out.glob(".*.tmp"))                              # every file was renamed into place
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base-f16.gguf\nADAPTER ./adapter.gguf\n" in modelfile and "PARAMETER temperature 0" in modelfile
    assert "FROM ./merged-f16.gguf" in (out / "Modelfile.merged").read_text()
    names = {m.model.split(":")[0] for m in ollama_server.client().list().models}
    assert {"movierec-test", "movierec-test-merged"} <= names
    for kind in ("adapter", "merged"):     # the goals, on the F16 base
        p = res["parity"][kind]
        assert p["n"] == 8 and p["mean_abs_diff"] <= 0.05 and p["argmax_agreement"] >= 0.98, (kind, p)


@pytest.mark.slow
def test_quantized_copies_are_created_measured_and_one_is_served(deployed, ollama_server):
    "quantize: NAME-q8_0 and NAME-q4_k_m from the merged F16 GGUF, each with its size, speed and accuracy next to PyTorch's."
    res, adapter, out = deployed
    assert res["models"] == {"adapter": "movierec-test", "merged": "movierec-test-merged", "q8_0": "movierec-test-q8_0",
                             "q4_K_M": "movierec-test-q4_k_m"}
    v = res["variants"]
    assert [v[k]["quantization"] for k in ("adapter", "merged", "q8_0", "q4_K_M")] == ["F16", "F16", "Q8_0", "Q4_K_M"]
    assert v["merged"]["bytes"] > 1.8 * v["q8_0"]["bytes"] and v["q8_0"]["bytes"] > 1.2 * v["q4_K_M"]["bytes"]
    assert (res["serve_variant"], res["served_model"]) == ("q4_K_M", "movierec-test-q4_k_m")
    rmse_torch = res["parity"]["adapter"]["rmse_torch"]
    for kind in res["models"]:
        p = res["parity"][kind]
        assert p["n"] == 8 and p["ollama_preds_per_s"] > 0 and p["rmse_torch"] == rmse_torch, (kind, p)
        assert abs(p["rmse"] - rmse_torch - p["rmse_diff"]) < 1e-9 and p["rmse_diff_ci95"][0] <= p["rmse_diff"] <= p["rmse_diff_ci95"][1]
    assert res["parity"]["q8_0"]["mean_abs_diff"] <= 0.1, res["parity"]["q8_0"]   # 8 bits stay close to F16
    names = {m.model.split(":")[0] for m in ollama_server.client().list().models}
    assert {"movierec-test-q8_0", "movierec-test-q4_k_m"} <= names


@pytest.mark.slow
def test_bench_quantize_prints_the_trade_off_table(deployed, project_root, capsys):
    "bench/quantize.py's table: one row per served variant, with size, speed, RMSE next to PyTorch's and agreement."
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_quantize", project_root / "bench" / "quantize.py")
    quantize = importlib.util.module_from_spec(spec); spec.loader.exec_module(quantize)
    res, adapter, out = deployed
    table = quantize.trade_off_table(res)
    assert table.index.tolist() == ["adapter", "merged", "q8_0", "q4_K_M"]
    assert {"MB", "ratings/s", "rmse", "rmse - pytorch", "95% interval", "mean |diff|", "argmax agreement"} <= set(table.columns)
    assert table.loc["q4_K_M", "MB"] < table.loc["q8_0", "MB"] < table.loc["merged", "MB"]
    assert quantize.main(["--deploy-json", str(out / "deploy.json")]) == 0
    printed = capsys.readouterr().out
    assert "q4_K_M" in printed and "pytorch" in printed and "8 test ratings" in printed


@pytest.mark.slow
def test_ollama_cli_answers_with_the_rating(deployed, ollama_server, ml_prompts, torch_preds):
    "The official CLI on the exported Modelfile: `ollama create -f Modelfile`, `ollama run NAME PROMPT` answers the rating alone."
    from movierec.assets import ensure_ollama
    from movierec.model import smollm2_tokenizer
    from movierec.serve import ollama_predict
    res, adapter, out = deployed
    env = {**os.environ, "OLLAMA_HOST": ollama_server.host.removeprefix("http://"), "NO_COLOR": "1"}
    def cli(*args, cwd=None):   # an argument list: the prompts' metacharacters never meet a shell
        r = subprocess.run([str(ensure_ollama(build=False)), *args], env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=600, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        return r.stdout
    cli("create", "movierec-test-cli", "-f", "Modelfile", cwd=out)
    try:
        answers = [cli("run", "--nowordwrap", "movierec-test-cli", p).strip() for p in ml_prompts]
        raw = ollama_predict(ollama_server.client(), "movierec-test-cli", ml_prompts, smollm2_tokenizer(), concurrency=2,
                             num_ctx=res["num_ctx"])
    finally: ollama_server.client().delete("movierec-test-cli")
    assert answers == raw.response.tolist()                       # the greedy token after the same text as the scoring path's
    assert answers == [str(int(a)) for a in torch_preds.argmax], answers   # ... which is the rating PyTorch predicts
    assert not CANARY.exists()


class RefusesAdapters:
    "An Ollama client whose server refuses to create models from an adapter, as newer Ollama releases are reported to."
    def __init__(self, client): self.client = client
    def __getattr__(self, name): return getattr(self.client, name)
    def create(self, *a, adapters=None, **kw):
        import ollama
        if adapters: raise ollama.ResponseError("ADAPTER is no longer supported; create the model from merged weights", 400)
        return self.client.create(*a, **kw)


@pytest.mark.slow
def test_a_server_refusing_adapters_serves_the_merged_model(tmp_path, base_gguf, ml_targets, ollama_server):
    "The adapter refused: NAME is created from the merged GGUF, deploy.json says so, the Modelfile is the one that works."
    from movierec.deploy import DeployConfig, deploy, serve_deployed
    adapter = random_adapter(tmp_path / "adapter", base_gguf, layers=4)
    client = ollama_server.client()
    res = deploy(adapter, tmp_path / "gguf", DeployConfig(model_name="movierec-picky"), parity_prompts=ml_targets.head(4), concurrency=2,
                 client=RefusesAdapters(client))
    try:
        on_disk = json.loads((tmp_path / "gguf" / "deploy.json").read_text())
        assert on_disk["served_from"] == res["served_from"] == "merged" and res["models"] == {"merged": "movierec-picky"}
        assert on_disk["adapter_refused"] == "ADAPTER is no longer supported; create the model from merged weights"
        modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
        assert "FROM ./merged-f16.gguf\n" in modelfile and "ADAPTER" not in modelfile
        p = res["parity"]["merged"]
        assert p["n"] == 4 and p["mean_abs_diff"] <= 0.05 and p["argmax_agreement"] == 1, p
        assert client.show("movierec-picky").details.quantization_level == "F16"
        client.delete("movierec-picky")   # later stages create it again from the files, without an adapter too
        assert serve_deployed(RefusesAdapters(client), tmp_path / "gguf") == "movierec-picky"
        assert "ADAPTER" not in client.show("movierec-picky").modelfile
    finally: client.delete("movierec-picky")


@pytest.fixture(scope="module")
def torch_preds(deployed, ml_prompts):
    "The PyTorch adapter's predictions on the ML-100K prompts, as `deploy`'s parity check makes them (float32)."
    from movierec.model import load_adapter
    from movierec.score import score_prompts
    model, tok = load_adapter(deployed[1])
    return score_prompts(model, tok, ml_prompts, progress=False, autocast=False)


@pytest.mark.slow
def test_ollama_own_import_of_the_peft_folder(deployed, ollama_server, ml_prompts, torch_preds):
    "Ollama 0.21's import of the PEFT folder is wrong for llama q/k; the workaround copy proves the diagnosis exact."
    from ollama_import import create_ollama_imports
    from movierec.model import smollm2_tokenizer
    from movierec.serve import ollama_predict, parity
    res, adapter, out = deployed
    client, tok = ollama_server.client(), smollm2_tokenizer()
    models = create_ollama_imports(client, "movierec-test", adapter, out / "base-f16.gguf", out / "ollama-import")
    try:
        preds = {kind: ollama_predict(client, m, ml_prompts, tok, concurrency=2, num_ctx=res["num_ctx"])
                 for kind, m in {**models, "ours": res["models"]["adapter"]}.items()}
    finally:
        for m in models.values(): client.delete(m)
    fixed, raw = parity(preds["peft_import_workaround"], torch_preds), parity(preds["peft_import"], torch_preds)
    assert fixed["n"] == raw["n"] == 8 and (out / "ollama-import" / "adapter_model.safetensors").is_file()
    assert fixed["mean_abs_diff"] <= 0.05 and fixed["argmax_agreement"] >= 0.98, fixed
    assert raw["mean_abs_diff"] > 3 * fixed["mean_abs_diff"], f"Ollama now imports the folder right ({raw}): drop the workaround"
    # the copy's import and our GGUF are the same adapter, up to the last bits of the kernels
    same = parity(preds["peft_import_workaround"], preds["ours"])
    assert same["mean_abs_diff"] < 0.01 and same["argmax_agreement"] == 1, same


def test_ollama_import_workaround_layout(tmp_path, base_gguf):
    "The workaround copy: q/k lora_B permuted as in our GGUF, lora_A pre-shuffled so that Ollama's converter restores it."
    from safetensors.numpy import load_file
    from ollama_import import _ollama_lora_a_shuffle, ollama_import_workaround
    from movierec.export import lora_tensors, permute_qk
    a = np.arange(4 * 576, dtype=np.float32).reshape(4, 576)
    assert np.array_equal(_ollama_lora_a_shuffle(_ollama_lora_a_shuffle(a, 9, inverse=True), 9), a)
    assert np.array_equal(_ollama_lora_a_shuffle(a, 9).ravel(), permute_qk(a.reshape(576, 4), 9).ravel())
    toy = random_adapter(tmp_path / "toy", base_gguf, layers=2, r=4, alpha=8)
    tensors, _, _ = lora_tensors(toy)
    orig = load_file(toy / "adapter_model.safetensors")
    fixed = load_file(ollama_import_workaround(toy, tmp_path / "toy-for-ollama") / "adapter_model.safetensors")
    k_b, q_a, v_b = (f"base_model.model.model.layers.1.self_attn.{m}.weight" for m in ("k_proj.lora_B", "q_proj.lora_A", "v_proj.lora_B"))
    assert np.array_equal(fixed[k_b], tensors["blk.1.attn_k.weight.lora_b"])            # B permuted as in our GGUF
    assert np.array_equal(_ollama_lora_a_shuffle(fixed[q_a], 9), orig[q_a])              # A comes out of the converter as it was
    assert np.array_equal(fixed[v_b], orig[v_b]) and fixed.keys() == orig.keys()         # v, o untouched


@pytest.mark.slow
def test_adapter_changes_ratings_and_titles_are_harmless(deployed, ollama_server, ml_prompts):
    "The parity above is not that of a no-op adapter; the shell-metacharacter title was rated and ran nothing."
    from movierec.model import smollm2_tokenizer
    from movierec.serve import create_model, ollama_predict
    res, adapter, out = deployed
    client, tok = ollama_server.client(), smollm2_tokenizer()
    create_model(client, "movierec-test-base", out / "base-f16.gguf", overwrite=True)
    try:
        base = ollama_predict(client, "movierec-test-base", ml_prompts[:4], tok, concurrency=2)
        tuned = ollama_predict(client, "movierec-test", ml_prompts[:4], tok, concurrency=2)
    finally: client.delete("movierec-test-base")
    assert np.abs(base.pred - tuned.pred).mean() > 10 * res["parity"]["adapter"]["mean_abs_diff"]
    assert tuned.pred.between(1, 5).all() and (tuned.argmax > 0).all()
    assert not CANARY.exists()


@pytest.mark.slow
def test_modelfile_and_api_keep_metacharacters(tmp_path, ollama_server, deployed):
    "The same text goes through the Modelfile and `create` unchanged: SYSTEM comes back as written."
    from movierec.export import write_modelfile
    from movierec.serve import create_model
    res, adapter, out = deployed
    system = f"You rate movies. Never run {NASTY}"
    mf = write_modelfile(tmp_path, out / "base-f16.gguf", out / "adapter.gguf", system=system)
    assert f'SYSTEM """{system}"""' in mf.read_text()
    shown = create_model(ollama_server.client(), "movierec-test-sys", out / "base-f16.gguf", out / "adapter.gguf", system=system)
    try: assert system in shown["modelfile"]
    finally: ollama_server.client().delete("movierec-test-sys")
    assert not CANARY.exists()
    with pytest.raises(MovierecError, match="three double quotes"):
        write_modelfile(tmp_path, out / "base-f16.gguf", system='say """ twice')


@pytest.mark.slow
def test_name_taken_without_overwrite(deployed, ollama_server):
    from movierec.serve import create_model
    res, adapter, out = deployed
    with pytest.raises(MovierecError, match="already has a model named 'movierec-test'.*overwrite"):
        create_model(ollama_server.client(), "movierec-test", out / "base-f16.gguf", out / "adapter.gguf")


def test_unreachable_server_says_how_to_start_one(tmp_path):
    import ollama
    from movierec.ollama_server import connect_or_start
    from movierec.serve import create_model
    dead = ollama.Client(host=f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(MovierecError, match="No Ollama server answers.*ollama serve"):
        create_model(dead, "x", "smollm2:135m")
    with pytest.raises(MovierecError, match="No Ollama answers at"):
        connect_or_start(f"127.0.0.1:{free_port()}")


@pytest.mark.parametrize("targets,lora,match", [
    (("q_proj", "embed_tokens"), {}, "embedding and lm_head adapters cannot be exported"),
    (("q_proj", "lm_head"), {}, "embedding and lm_head adapters cannot be exported"),
    (("q_proj", "v_proj"), {"use_dora": True}, "DoRA"),
    (("q_proj",), {"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_unsupported_adapters_are_refused(tmp_path, base_gguf, targets, lora, match):
    from movierec.export import export_adapter_gguf
    ad = random_adapter(tmp_path / "ad", base_gguf, targets=targets, layers=1, **lora)
    with pytest.raises(MovierecError, match=match):
        export_adapter_gguf(ad, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


def test_wrong_base_and_architecture_are_refused(tmp_path, base_gguf):
    import gguf
    from movierec.export import export_adapter_gguf
    from movierec.serve import create_model
    ad = random_adapter(tmp_path / "ad", base_gguf, layers=1)
    phi = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(phi, "phi3"); w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(MovierecError, match="'phi3'.*not supported"):
        export_adapter_gguf(ad, tmp_path / "a.gguf", base_gguf=phi)
    export_adapter_gguf(ad, tmp_path / "a.gguf")
    with pytest.raises(MovierecError, match="is for 'llama' but the base phi3.gguf is 'phi3'"):
        create_model(object(), "x", phi, tmp_path / "a.gguf")
    # an adapter trained on a model of other shapes (hidden 64) does not fit SmolLM2
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    small = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                        num_attention_heads=4, num_key_value_heads=2)),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    small.save_pretrained(tmp_path / "small")
    (tmp_path / "small" / "movierec.json").write_text(json.dumps({"base_model": str(base_gguf)}))
    with pytest.raises(MovierecError, match="trained on another model"):
        export_adapter_gguf(tmp_path / "small", tmp_path / "b.gguf")
