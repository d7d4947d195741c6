#!/usr/bin/env bash
# The GPU check: every script on CUDA (twins in bf16 and fp16, bitsandbytes int8/int4, NVML energy),
# results written to results/. Run it on a machine with an NVIDIA GPU, from the repository root, with the
# project's requirements installed (a session lent a GPU machine runs it through the device tool):
#
#     bash tests/gpu_check.sh            # about 3 to 6 minutes on one H100/H200
#
# Nothing in CI needs a GPU: tests/test_gpu.py skips there. What this prints is what docs/status.md quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 BILLION_LLM_ALLOW_CODE_EXECUTION=0
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,power.draw --format=csv || true
python energy.py --device cuda --idle 5
# Every script on CUDA with tiny models (bf16, fp16, int8, int4), and NVML energy in a chat footer.
python -m pytest -q -p no:cacheprovider tests/test_gpu.py
# Speed, memory and energy of the five default architectures at their real size (random-weight twins,
# no download), bf16, as the comparison page shows them; then one in fp16.
python benchmark.py --synthetic --models tinyllama llama3.2-1b stablelm-1.6b pythia-1b qwen2.5-1.5b \
    --device cuda --repetitions 5 --prompt-tokens 512 --new-tokens 128
python benchmark.py --synthetic --models qwen2.5-1.5b --device cuda --dtype fp16 --repetitions 3
echo "gpu_check: done; results/benchmark-*.json written, python benchmark.py --report to put them on the page"
