# Source on a lent GPU machine (no network): installs the wheels carried in .whl/ (OpenMM with its
# CUDA plugin, mdtraj; pure-Python packages in .whl/pylib) into /tmp/site and points PYTHONPATH and
# LD_LIBRARY_PATH (the image's own CUDA runtime, NVRTC and cuFFT) at them. Without .whl/ it does
# nothing. Returns non-zero if the install fails. Used by benchmarks/gpu_checks.sh and training/gpu_md.sh.
if [ -d .whl ]; then
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD/.whl/pylib:$PWD
  NVLIBS=$(find / -xdev \( -name 'libcudart.so*' -o -name 'libnvrtc.so*' -o -name 'libcufft.so*' \) -path '*nvidia*' 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
  export LD_LIBRARY_PATH=${NVLIBS}${LD_LIBRARY_PATH:-}
fi
