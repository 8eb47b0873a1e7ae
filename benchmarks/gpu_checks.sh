#!/usr/bin/env bash
# CUDA correctness and GPU speed figures, as one short script for a lent GPU machine (no network).
# Its python3 holds a CUDA build of torch; OpenMM, mdtraj and pdbfixer travel in .whl/ (see
# benchmarks/RESULTS.md, "GPU"). Every part has its own time limit so the whole fits ~7 minutes.
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ -d .whl ] || { echo "gpu_checks: no .whl/ with the OpenMM and mdtraj wheels (see benchmarks/RESULTS.md, GPU)"; exit 1; }
source benchmarks/gpu_env.sh || exit 1
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
