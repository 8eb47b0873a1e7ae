"""Helpers for the training-script tests (a uniquely named module: tests/ has several conftest.py).

``training/`` is a folder of scripts, not a package, so its modules are loaded from their files
under unique names (``starmd_training_<name>``) rather than put first on sys.path, where
``training/data.py`` could shadow or be shadowed by other modules named ``data``.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINING = REPO / "training"
STRUCTURES = TRAINING / "structures"


def load_training_module(name: str):
    """Import training/<name>.py under the name ``starmd_training_<name>``."""
    key = f"starmd_training_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if str(TRAINING) not in sys.path:
        sys.path.insert(0, str(TRAINING))  # run_queue imports its sibling `simulate`
    spec = importlib.util.spec_from_file_location(key, TRAINING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


SHORT_ARGS = ["--ns", "0.0048", "--frame-ps", "0.2", "--equil-ps", "0.2", "--checkpoint-frames", "4",
              "--threads", "1", "--platform", "CPU", "--seed", "7"]


def run_simulate(pdb, out, *extra, check=True):
    cmd = [sys.executable, str(TRAINING / "simulate.py"), str(pdb), "--out", str(out), *SHORT_ARGS, *extra]
    env = dict(os.environ, OPENMM_CPU_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)
    if check and proc.returncode not in (0,):
        raise AssertionError(f"simulate.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


