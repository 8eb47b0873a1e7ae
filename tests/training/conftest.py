"""Fixtures for the training scripts: one real, killed-and-resumed MD run.

``short_run`` simulates 2M9I (34 residues, the smallest natural domain in
training/structures) with frames every 0.2 ps: a first process is killed abruptly
(``--stop-after-frames 10 --hard-stop``, os._exit) two frames after its checkpoint at frame 8,
then the same command resumes it to 24 frames. Shared by the simulate and prepare tests so the
MD runs once per session.
"""
from __future__ import annotations

import shutil

import pytest

from training_helpers import STRUCTURES, run_simulate


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """A killed-then-resumed run; returns paths, the killed DCD copy and both process results."""
    out = tmp_path_factory.mktemp("md") / "2M9I" / "r0"
    pdb = STRUCTURES / "2M9I.pdb"
    killed = run_simulate(pdb, out, "--stop-after-frames", "10", "--hard-stop", check=False)
    killed_dcd = out.parent / "killed.dcd"
    shutil.copy(out / "traj.dcd", killed_dcd)
    killed_ckpt = (out / "checkpoint.json").read_text()
    resumed = run_simulate(pdb, out)
    return dict(out=out, pdb=pdb, killed=killed, killed_dcd=killed_dcd, killed_ckpt=killed_ckpt, resumed=resumed)
