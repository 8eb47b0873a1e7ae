#!/usr/bin/env bash
# Grow the reference MD on a lent GPU machine for a fixed time, then turn it into shards there.
#
#   OUT=/tmp/gpu_md MD_SECONDS=270 WORKERS=2 bash training/gpu_md.sh
#
# Measured on an H200 (2026-11-27): one OpenMM CUDA process runs 2.2-2.5e3 ns/day for 20-56
# residues (benchmarks/speed_vs_md.py), but 12 processes sharing the GPU ran 121 ns/day each
# (1.45e3 in all): small implicit-solvent systems are launch-bound and the contexts take turns.
# So use one or two workers per GPU (more GPUs: one machine each).
#
# Runs WORKERS copies of training/run_queue.py on OpenMM's CUDA platform (each restores its
# trajectories from the committed training/md_state and walks training/plan.json, so they share
# the plan's next stage through its lock files), stops them after MD_SECONDS (every trajectory
# keeps what its last checkpoint holds: checkpoints are atomic and prepare.py reads only
# checkpointed frames), runs training/prepare.py there, and packs every shard, manifest and
# md_state file it changed into OUT/new_data.tar.gz.part_* (15 MB pieces). Apply them here with
#   cat new_data.tar.gz.part_* | tar xzf -   then remove training/md/ so the queue restores from md_state.
# The machine has no network: OpenMM, mdtraj and pdbfixer travel in .whl/ (benchmarks/gpu_checks.sh).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_md}; mkdir -p "$OUT"
MD_SECONDS=${MD_SECONDS:-270}; WORKERS=${WORKERS:-2}; PY=${PY:-python3}; PLATFORM=${PLATFORM:-CUDA}
source benchmarks/gpu_env.sh || exit 1
mkdir -p training/md; rm -f training/md/STOP
marker=$(mktemp); sleep 1
for w in $(seq 0 $((WORKERS - 1))); do
  "$PY" training/run_queue.py --worker "g$w" --platform "$PLATFORM" --threads 1 > "training/md/queue_g$w.log" 2>&1 &
done
sleep "$MD_SECONDS"
pkill -9 -f training/run_queue.py; sleep 2
grep -h "ns/day\|FAILED\|restored" training/md/queue_g*.log > "$OUT/queue.log"
timeout 150 "$PY" training/prepare.py --summary > "$OUT/prepare.log" 2>&1; echo "prepare rc $?" >> "$OUT/prepare.log"
find training/data training/md_state -type f -newer "$marker" > "$OUT/changed.txt"
tar czf - -T "$OUT/changed.txt" | split -b 15m - "$OUT/new_data.tar.gz.part_"
ls -la "$OUT"; tail -40 "$OUT/prepare.log"
