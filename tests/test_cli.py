"""`starmd run` end to end on a real protein with a small random model, and its input checks."""
import json
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch

from openmm_starmd.checkpoints import save_model
from openmm_starmd.cli import build_parser, main, parse_time_ns
from openmm_starmd.diffusion.config import DiffusionConfig
from openmm_starmd.model.config import model_config
from openmm_starmd.model.network import StarMDNetwork
from openmm_starmd.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
WW_DOMAIN = ROOT / "training" / "structures" / "2M9I.pdb"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = model_config("default", width=32, heads=2, blocks=1, joint_layers=1, frame_layers=0)
    path = tmp_path_factory.mktemp("model") / "small.pt"
    # x0_anchor="noisy": a fresh network then returns its noisy input, so replicas and seeds differ
    # (with the default anchor a fresh network deterministically repeats the previous frame)
    cfg.x0_anchor = "noisy"
    save_model(path, StarMDNetwork(cfg), DiffusionConfig(), SamplingConfig(steps=3))
    return path


def test_parse_time_ns():
    assert parse_time_ns("1us", "t") == 1000.0
    assert parse_time_ns("10 ns", "t") == 10.0
    assert parse_time_ns("500ps", "t") == pytest.approx(0.5)
    with pytest.raises(Exception, match="unit"):
        parse_time_ns("10", "--time")


def test_run_writes_every_output(small_model, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    rc = main(["run", str(WW_DOMAIN), "--time", "6ns", "--dt", "1ns", "--report-every", "3ns", "-o", str(out),
               "--model", str(small_model), "--seed", "3", "-q"])
    assert rc == 0
    assert not (out / ".partial").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["frames"] == 6 and record["all_atom_frames"] == 2 and record["seed"] == 3
    assert isinstance(record["strained_frames"], int) and 0 <= record["strained_frames"] <= 2
    assert record["backmap"] == "vacuum" and record["backmap_dielectric"] == 16.0
    allatom = md.load(str(out / "traj.dcd"), top=str(out / "prepared.pdb"))
    assert allatom.n_frames == 2 and np.isfinite(allatom.xyz).all()
    ca = md.load(str(out / "traj_ca.dcd"), top=str(out / "ca.pdb"))
    assert ca.n_frames == 6 and ca.n_atoms == 34
    assert np.isfinite(ca.xyz).all()
    # the Cα projection is on by default and the record says what it did: this untrained network
    # scatters residues tens of nm apart (a violation of ~40 nm), and the projection pulls every
    # chain link back to within 0.1 Å of its bounds even where it cannot finish
    proj = record["ca_projection"]
    assert record["ca_geometry"] is True and proj["frames"] == proj["moved"] == 6
    assert proj["max_violation_nm"] > 1.0 and 0 <= proj["unconverged"] <= 6
    links = np.linalg.norm(np.diff(ca.xyz, axis=1), axis=-1)
    start = md.load(str(out / "prepared.pdb"))
    start_links = np.linalg.norm(np.diff(start.xyz[0, start.topology.select("name CA")], axis=0), axis=-1)
    lo, hi = np.minimum(0.36, start_links), np.maximum(0.41, start_links)  # a start outside keeps its own
    tol = 2e-4 if proj["unconverged"] == 0 else 0.01
    assert (links > lo - tol).all() and (links < hi + tol).all()
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 reports
    time_ps = [float(r.split(",")[1]) for r in rows[1:]]
    assert time_ps == pytest.approx([3000.0, 6000.0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--time", "10"], "unit"),
        (["--time", "5ns", "--dt", "2ns"], "whole number"),
        (["--dt", "50ns", "--time", "50ns", "--report-every", "50ns"], "range"),
    ],
)
def test_run_bad_input_is_a_clear_error(small_model, tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        rc = main(["run", str(WW_DOMAIN), "-o", str(out), "--model", str(small_model), "-q", *argv])
        raise SystemExit(rc)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert message in err
    assert not (out / "run.json").exists()


def test_help_lists_the_commands():
    text = build_parser().format_help()
    for cmd in ("run", "run-many", "evaluate", "evaluate-many"):
        assert cmd in text


def test_run_many_splits_rows_over_torchrun_ranks_and_resumes(small_model, tmp_path):
    """Two torchrun processes (PyTorch's own launcher) share a CSV of proteins; a rerun skips finished ones."""
    import csv
    import os
    import subprocess
    import sys

    manifest = tmp_path / "proteins.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "input", "time", "seed"])
        w.writerow(["ww_a", str(WW_DOMAIN), "2ns", "1"])
        w.writerow(["ww_b", str(WW_DOMAIN), "3ns", "2"])
    out = tmp_path / "many"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "openmm_starmd.cli", "run-many", str(manifest), "-o", str(out), "--dt", "1ns",
           "--report-every", "1ns", "--model", str(small_model), "--device", "cpu", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # a rank's own error line ("starmd: ...") first: torchrun's summary after it hides the cause
    errors = [line for line in first.stderr.splitlines() if "starmd:" in line or "Error" in line]
    assert first.returncode == 0, ("\n".join(errors[-5:]), first.stderr[-800:])
    assert "[rank 0] ww_a" in first.stdout and "[rank 1] ww_b" in first.stdout
    assert json.loads((out / "ww_a" / "run.json").read_text())["frames"] == 2
    assert json.loads((out / "ww_b" / "run.json").read_text())["frames"] == 3
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 2


def test_replicas_are_batched_independent_trajectories(small_model, tmp_path):
    """--replicas 3: one batched rollout, three trajectories that differ from each other, each with every file."""
    torch.set_num_threads(1)
    out = tmp_path / "ens"
    rc = main(["run", str(WW_DOMAIN), "--time", "4ns", "--dt", "1ns", "--report-every", "2ns", "-o", str(out),
               "--model", str(small_model), "--seed", "5", "--replicas", "3", "--backmap", "none", "-q",
               "--no-ca-geometry"])
    assert rc == 0 and not (out / ".partial").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["replicas"] == 3 and record["frames"] == 4 and record["ca_geometry"] is False
    assert record["backmap"] == "none" and record["backmap_dielectric"] is None
    assert record["strained_frames"] == 0  # recorded for replica runs too (none strained with this seed)
    cas = []
    for k in range(3):
        ca = md.load(str(out / f"replica_{k}" / "traj_ca.dcd"), top=str(out / "ca.pdb"))
        allatom = md.load(str(out / f"replica_{k}" / "traj.dcd"), top=str(out / "prepared.pdb"))
        assert ca.n_frames == 4 and allatom.n_frames == 2
        assert np.isfinite(ca.xyz).all() and np.isfinite(allatom.xyz).all()
        # rigid transport only: the all-atom Cα sit exactly on the generated frame origins
        ca_idx = allatom.topology.select("name CA")
        np.testing.assert_allclose(allatom.xyz[:, ca_idx], ca.xyz[1::2], atol=2e-3)
        cas.append(ca.xyz)
    assert np.abs(cas[0] - cas[1]).max() > 0.05 and np.abs(cas[1] - cas[2]).max() > 0.05
