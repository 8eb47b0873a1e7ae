#!/usr/bin/env bash
# CUDA correctness and GPU speed figures, as one short script for a lent GPU machine (no network).
# Its python3 holds a CUDA build of torch; OpenMM, mdtraj and pdbfixer travel in .whl/ (see
# benchmarks/RESULTS.md, "GPU"). Every part has its own time limit so the whole fits ~7 minutes.
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.whl/pylib:$PWD
NVLIBS=$(find / -xdev \( -name 'libcudart.so*' -o -name 'libnvrtc.so*' -o -name 'libcufft.so*' \) -path '*nvidia*' 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=${NVLIBS}${LD_LIBRARY_PATH:-}
python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import openmm, torch
names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
print("openmm", openmm.__version__, names, "failures:", openmm.Platform.getPluginLoadFailures())
print("torch", torch.__version__, torch.cuda.get_device_name(0))
PY
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_cuda.py tests/test_integrator.py -k cuda 2>&1 | tee "$OUT/pytest.log"
timeout 150 python3 benchmarks/speed_vs_md.py --md-steps 5000 --frames 40 2>&1 | grep -v '%|' | tee "$OUT/speed_vs_md.log"
timeout 100 python3 benchmarks/sampler_speed.py --device cuda --residues 60 200 --history 1 100 1000 --modes full window --budget 8 --json "$OUT/sampler.json" 2>&1 | grep -v '%|' | tee "$OUT/sampler.log"
timeout 60 python3 benchmarks/train_throughput.py --device cuda --residues 48 128 --batch 1 4 16 2>&1 | tee "$OUT/train.log"
