#!/usr/bin/env bash
# Pack what a GPU machine without internet needs for bench/gpu_offline/{train,evaluate}.sh into parts that the
# device tool carries one call at a time (64 MiB a call, the checkout included): .gpu1/part.00, .gpu2/part.01, ...
#
#   bash bench/gpu_offline/pack.sh runs/default/data      # a folder written by `movierec data` (its classic.pkl too)
#   QLORA=1 bash bench/gpu_offline/pack.sh ...            # also bitsandbytes, for train.sh's QLoRA steps (one more part)
#
# The payload: the packages the GPU image lacks or holds in other versions (requirements.lock's pins; bitsandbytes with
# only its CUDA 13 and CPU libraries), the default GGUF, MovieLens-100K, the tokenizer cache, and the prepared data.
# ranx imports ir_datasets at the top and movierec never uses it, so a one-line stand-in takes its place there.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?usage: pack.sh DATA_DIR (a folder written by movierec data)}
PINS="pydantic pydantic_core annotated-types typing-inspection gguf scikit-surprise implicit ranx peft transformers pandas fastcore orjson cbor2 lz4"
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/whl" "$W/pay/site" "$W/pay/data/models" "$W/pay/data/cache" "$W/pay/gpurun"
specs=(); [ "${QLORA:-0}" = 1 ] && specs+=(bitsandbytes==0.50.2)
for p in $PINS; do
  v=$(grep -i -E "^${p//[-_]/[-_]}==" requirements.lock | head -1 | cut -d= -f3)
  specs+=("$p${v:+==$v}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$W/whl" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${specs[@]}"
for w in "$W"/whl/*.whl; do unzip -q -o "$w" -d "$W/pay/site"; done
[ -d "$W/pay/site/bitsandbytes" ] && find "$W/pay/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
mkdir -p "$W/pay/site/ir_datasets" && echo '"Stand-in for ranx'"'"'s top-level import (movierec never downloads qrels)."' > "$W/pay/site/ir_datasets/__init__.py"
cp data/models/*.gguf "$W/pay/data/models/" && cp -r data/ml-100k "$W/pay/data/" && cp -r data/cache/tokenizers "$W/pay/data/cache/"
cp -r "$DATA" "$W/pay/gpurun/data"
tar -C "$W/pay" -cf - . | gzip -1 | split -b 55000000 -d - "$W/part."
rm -rf .gpu[0-9]*; i=1
for part in "$W"/part.*; do mkdir -p ".gpu$i"; mv "$part" ".gpu$i/"; i=$((i + 1)); done
ls -la .gpu*/
echo "carry .gpu1 ... one per call: stage.sh for all but the last (the first with 'check'), then train.sh with the last, then evaluate.sh"
