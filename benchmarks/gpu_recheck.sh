#!/usr/bin/env bash
# A short second GPU call after fixes: the compiled-Triton CUDA test, the Triton alignment table,
# the one-process P2P timing + profile sweep, and the features the first check had no time for.
# Device call (after `bash benchmarks/gpu_wheels.sh` here): carry [".whl"], timeout_s 390:
#     bash benchmarks/gpu_recheck.sh "$OUT"
set -u -o pipefail
OUT=${1:?usage: bash benchmarks/gpu_recheck.sh OUT_DIR}
mkdir -p "$OUT"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo "[recheck +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt" >&2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$OUT/log.txt" 2>&1
export PYTHONPATH=/tmp/site
python3 - <<'PYEOF' >> "$OUT/log.txt" 2>&1
import shutil
from pathlib import Path
site = Path("/tmp/site/attnctrl")
ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
for src, dst in (("attnctrl", site), ("processors", site / "processors"), ("pipelines", site / "pipelines"), ("app", site / "app")):
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=ignore)
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/log.txt" 2>&1
log "tests"
timeout -k 5 75 python3 -P -m pytest -q -p no:cacheprovider -rfEs tests/test_triton.py -k "cuda_compiled" > "$OUT/tests.txt" 2>&1
log "tests exit $?"
timeout -k 5 40 python3 -P benchmarks/triton_alignment.py --out "$OUT/triton_alignment.md" >> "$OUT/log.txt" 2>&1
log "triton_alignment exit $?"
timeout -k 5 120 python3 -P benchmarks/gpu_p2p_profile.py --sizes 512 1024 2048 --steps 20 10 5 --repeats 3 2 1 --budget 95 --out "$OUT" >> "$OUT/log.txt" 2>&1
log "p2p_profile exit $?"
left=$(( 330 - ($(date +%s) - T0) ))
if (( left > 30 )); then
    timeout -k 5 "$left" python3 -P benchmarks/gpu_features.py --device cuda --families sd15 --dtypes fp16 bf16 --no-cli \
        --only policy forced preset "p2p Replace" --budget $(( left - 15 )) --out "$OUT/features" >> "$OUT/log.txt" 2>&1
    log "features exit $?"
    mv "$OUT/features/features.md" "$OUT/features.md" 2>/dev/null; rm -rf "$OUT/features"
fi
log "done"
