"""benchmarks/fidelity_table.py's inputs: references from the training shards, start structures
rebuilt on their frame 0 (the all-atom run directories of a fresh clone hold only the MD since the
restore, so they cannot be the reference)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest

from openmm_starmd.data import load_shard

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "training" / "data" / "manifest.json"


def _module():
    spec = importlib.util.spec_from_file_location("starmd_bench_fidelity_table", REPO / "benchmarks" / "fidelity_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


fidelity = _module()


def _complete_test_protein():
    entries = json.loads(MANIFEST.read_text())["shards"]
    for name in ("2M9I", "villin_hp35", "crambin_1ejg"):
        reps = [e for e in entries if e["protein"] == name]
        if len(reps) == 2 and all(e["complete"] for e in reps):
            return name, reps
    pytest.skip("no test protein with two complete replicas in the committed manifest")


def test_references_are_every_frame_of_the_shards_and_the_start_sits_on_frame_0(tmp_path):
    name, entries = _complete_test_protein()
    (t,), skipped = fidelity.find_targets([name, "not_a_protein"], MANIFEST, tmp_path / "refs", tmp_path / "no_md")
    assert skipped == {"not_a_protein": "no reference MD: not in the manifest"}
    shard = load_shard(str(MANIFEST.parent / entries[0]["file"]))
    ref = md.load(str(t.reference.traj), top=str(t.reference.top))
    assert ref.n_frames == t.reference.n_frames == shard.n_frames
    np.testing.assert_allclose(ref.xyz[:, ref.topology.select("name CA")], shard.coords_nm[:, :, 1], atol=1e-5)
    assert t.replica is not None and t.replica.n_frames == entries[1]["frames"]
    assert t.reference.allatom is None and any("Cα only" in n for n in t.notes)  # no MD folder given
    start = fidelity.write_start(t, tmp_path / "start.pdb")
    s = md.load(str(start))
    for j, atom in enumerate(("N", "CA", "C", "O")):
        got = s.xyz[0, s.topology.select(f"protein and name {atom}")]
        assert np.sqrt(np.mean(np.sum((got - shard.coords_nm[0, :, j]) ** 2, -1))) < 0.01  # 0.1 Å
    assert s.n_atoms > 4 * shard.n_residues  # side chains and hydrogens are there


def test_an_incomplete_replica_is_not_a_reference(tmp_path):
    name, entries = _complete_test_protein()
    entry = dict(entries[0], complete=False)
    run, why = fidelity.load_md_run(entry, MANIFEST, tmp_path)
    assert run is None and "not finished" in why
