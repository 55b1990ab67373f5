# Sourced by the steps below: the unpacked payload's packages first (what the GPU image lacks or holds in
# other versions than requirements.lock), movierec from this checkout, assets and caches from the payload.
export PYTHONPATH=/root/pay/site:$PWD MOVIEREC_DATA=/root/pay/data MOVIEREC_CACHE=/root/cache HF_HUB_OFFLINE=1 \
       PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH=$PWD/bench/gpu_offline:$PATH
DATA=/root/pay/gpurun/data RUN=/root/gpu
