"""Ollama 0.21's own import of a PEFT adapter folder (`ADAPTER <folder>`), and a copy of the folder that it converts right.

Ollama can convert a PEFT folder itself, but v0.21.0 gets llama's q/k wrong: `repack` in
`convert/convert_llama_adapter.go` leaves `lora_B` as it is and applies the q/k permutation to `lora_A`
instead, reading its `(r, in)` buffer as if it were `(in, r)`, and with all `n_head` heads for k too (the
adapter config has no KV head count). So a PEFT folder imported by Ollama predicts other ratings than
PyTorch. movierec deploys its own GGUF export (`export.export_adapter_gguf`) and never hands Ollama the
folder; this module is the test side of the bug.

`ollama_import_workaround` writes a copy of the folder that this converter turns into the right adapter:
q/k `lora_B` permuted as llama.cpp needs, and `lora_A` shuffled with the inverse of what the converter will
do to it. `tests/test_deploy.py` checks that Ollama's import of the copy agrees with PyTorch (the diagnosis
is exact) and that its import of the folder as it is does not, so it fails the day Ollama fixes it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from movierec.core import MovierecError, atomic_path, write_text
from movierec.export import QK_HEADS, _PEFT_KEY, lora_tensors, permute_qk
from movierec.serve import create_model


def _ollama_lora_a_shuffle(a: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    "What Ollama 0.21's converter does to a q/k `lora_A` `(r, in)`: `permute_qk` of its buffer read as `(in, r)`."
    r, n_in = a.shape
    if n_in % (2 * n_head): raise MovierecError(f"lora_A with {n_in} columns cannot be split into {n_head} heads of pairs.")
    return (a.reshape(n_head, n_in // n_head // 2, 2, r) if inverse else a.reshape(n_head, 2, n_in // n_head // 2, r)).swapaxes(1, 2).reshape(r, n_in)


def ollama_import_workaround(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base_gguf=None) -> Path:
    "A copy of a PEFT adapter folder that Ollama 0.21's own import (`ADAPTER <folder>`) converts right for llama."
    from safetensors.numpy import load_file, save_file
    d, out = Path(adapter_dir), Path(out_dir)
    _, _, base = lora_tensors(d, base_gguf)   # the GGUF export's checks: shapes, architecture, what cannot be converted
    fixed = {}
    for k, v in load_file(d / "adapter_model.safetensors").items():
        mod, ab = _PEFT_KEY.match(k).group(2, 3)
        if mod in QK_HEADS:
            if ab == "B": v = permute_qk(v, base[QK_HEADS[mod]])
            else: v = _ollama_lora_a_shuffle(v, base["n_head"], inverse=True)   # it uses n_head for k as well
        fixed[k] = np.ascontiguousarray(v)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "adapter_model.safetensors") as tmp: save_file(fixed, str(tmp), metadata={"format": "pt"})
    write_text(out / "adapter_config.json", (d / "adapter_config.json").read_text())
    return out


def create_ollama_imports(client, name: str, adapter_dir: str | os.PathLike, base_f16: str | os.PathLike,
                          workaround_dir: str | os.PathLike) -> dict[str, str]:
    "`NAME-peft-import` (Ollama's import of the folder as it is) and `NAME-peft-import-workaround` (of the copy): {kind: model}."
    folders = {"peft_import": Path(adapter_dir), "peft_import_workaround": ollama_import_workaround(adapter_dir, workaround_dir)}
    return {kind: create_model(client, f"{name}-{kind.replace('_', '-')}", base_f16, folder, overwrite=True)["name"]
            for kind, folder in folders.items()}
