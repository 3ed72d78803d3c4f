#!/usr/bin/env bash
# Run on the lent GPU machine (device tool): build the extension there, run the whole test suite
# (the CUDA tests included) and the demo on CUDA. Everything is logged under $OUT (or ./gpu_out).
#   bash .ci/gpu_check.sh
# Wheels the image lacks (gguf) are carried in .whl/ (see the device tool's README).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  # The device tool's copy of the tree has no usable git history: pass CQIL_COMMIT=<hash> from here.
  echo "commit: ${CQIL_COMMIT:-unknown}"
  echo "command: bash .ci/gpu_check.sh"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== build: pip install --no-build-isolation --no-deps ." | tee "$OUT/build.log"
time python3 -m pip install --no-build-isolation --no-deps . >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cqil info 2>&1 | tee -a "$OUT/env.txt"

echo "== tests"
# Run from outside the checkout so the installed package (with its compiled _C) is what is tested.
(cd /tmp && timeout 420 python3 -m pytest -q -rs -p no:cacheprovider "$OLDPWD/tests" 2>&1) | tee "$OUT/pytest.log" | tail -25
echo "== demo on CUDA (tiny random model: the SmolLM2 wheel is too large to carry)"
timeout 90 cqil demo --tiny --device cuda --dtype bfloat16 2>&1 | tee "$OUT/demo.log"
