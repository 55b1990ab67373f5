#!/usr/bin/env bash
# Step 3: unpack the payload, check the imports, train the default recipe on every training example (the GPU's
# auto sizes), then a few 4-bit (QLoRA) steps if the payload has bitsandbytes (QLORA=1 pack.sh) and time is left. Everything worth keeping goes to $OUT.
#   bash bench/gpu_offline/train.sh .gpu3 [movierec train flags, e.g. --batch-size 32]
set -u
T0=$(date +%s); cd "$(dirname "$0")/../.."
mkdir -p /root/pay && cat /root/stage/part.* "$1"/part.* | tar -xzf - -C /root/pay || { echo "untar failed"; exit 9; }
source bench/gpu_offline/env.sh
python3 - <<'PY' 2>&1 | tee $OUT/versions.txt
import importlib, torch
print("device", torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda)
for m in ["numpy", "pandas", "transformers", "peft", "accelerate", "gguf", "surprise", "implicit", "ranx", "numba", "bitsandbytes", "pydantic", "movierec.train", "movierec.evaluate", "movierec.retrieve"]:
    try: print(m, getattr(importlib.import_module(m), "__version__", "ok"))
    except Exception as e: print(m, "FAILED", repr(e))
PY
echo "== unpacked and checked after $(( $(date +%s) - T0 )) s"
timeout 420 movierec train --data $DATA --out $RUN/adapter --params params/default.yaml "${@:2}" 2>&1 | tee $OUT/train.log | grep -v -E '^\s*$|it/s\]$' | tail -40
echo "== train rc=${PIPESTATUS[0]} after $(( $(date +%s) - T0 )) s"
for f in train.json loss.csv movierec.json adapter_config.json adapter_model.safetensors; do cp $RUN/adapter/$f $OUT/ 2>/dev/null; done
left=$(( 560 - ($(date +%s) - T0) ))
if [ ! -d /root/pay/site/bitsandbytes ]; then echo "== qlora skipped: the payload has no bitsandbytes (QLORA=1 pack.sh)"
elif [ $left -gt 90 ]; then
  timeout $(( left - 10 )) bash -c 'source bench/gpu_offline/env.sh
    python3 -c "from movierec.model import load_base; m, t = load_base(None, device=\"cpu\"); m.save_pretrained(\"$RUN/base-hf\"); t.save_pretrained(\"$RUN/base-hf\")" &&
    movierec train --data $DATA --out $RUN/qlora --params params/default.yaml --base-model $RUN/base-hf --load-in-4bit \
      --max-steps 30 --train-examples 2000 --val-examples 0 --save-steps 30 --logging-steps 10' > $OUT/qlora.log 2>&1
  echo "== qlora rc=$? after $(( $(date +%s) - T0 )) s"; tail -5 $OUT/qlora.log
  cp $RUN/qlora/train.json $OUT/qlora_train.json 2>/dev/null
else echo "== qlora skipped: $left s left"; fi
