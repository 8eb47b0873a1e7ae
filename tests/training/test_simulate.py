"""training/simulate.py: a real run of a real protein, killed mid-run and resumed.

Properties: after the kill the checkpoint is behind the DCD; the resume truncates the DCD to the
checkpoint and appends, so the final trajectory has exactly the requested frames, the frames
before the checkpoint are bit-identical to the killed run's, the frames after it were
regenerated (new noise), no two consecutive frames are equal, and the step between frames is the
same across the resume boundary as elsewhere.
"""
from __future__ import annotations

import json
import struct

import mdtraj as md
import numpy as np
import openmm as mm
import openmm.app as app
import openmm.unit as u
import pytest

from training_helpers import STRUCTURES, load_training_module

simulate = load_training_module("simulate")


def _dcd_xyz(path, top):
    return md.load_dcd(str(path), top=str(top)).xyz


def test_kill_leaves_checkpoint_behind_dcd(short_run):
    assert short_run["killed"].returncode == 3, short_run["killed"].stderr[-2000:]
    assert json.loads(short_run["killed_ckpt"])["frames"] == 8
    _, _, n_atoms, header_frames = simulate.dcd_layout(str(short_run["killed_dcd"]))
    assert header_frames == 10 and n_atoms == 556


def test_resume_gives_continuous_trajectory(short_run):
    out = short_run["out"]
    top = out / "topology.pdb"
    xyz = _dcd_xyz(out / "traj.dcd", top)
    before = _dcd_xyz(short_run["killed_dcd"], top)
    assert xyz.shape == (24, 556, 3)
    assert simulate.dcd_layout(str(out / "traj.dcd"))[3] == 24
    np.testing.assert_array_equal(xyz[:8], before[:8])  # kept exactly
    assert not np.allclose(xyz[8:10], before[8:10])  # discarded and regenerated
    step = np.sqrt(((xyz[1:] - xyz[:-1]) ** 2).sum(-1).mean(-1))  # RMS displacement per frame
    assert step.min() > 1e-3  # no duplicated frame
    # the step across the resume boundary (frame 7 -> 8) looks like every other step
    assert step[7] < 2.0 * np.median(step) and step[7] > 0.3 * np.median(step)


def test_record_done_and_times(short_run):
    out = short_run["out"]
    record = json.loads((out / "record.json").read_text())
    assert record["settings"]["seed"] == 7 and record["settings"]["forcefield"] == "amber99-obc"
    assert record["versions"]["openmm"] == mm.__version__
    assert record["segments"][-1]["start_frame"] == 8 and record["segments"][-1]["end_frame"] == 24
    assert json.loads((out / "done").read_text())["frames"] == 24
    ckpt = json.loads((out / "checkpoint.json").read_text())
    state = mm.XmlSerializer.deserialize(ckpt["state_xml"])
    # frame k is written at (k + 1) * frame_ps; the last checkpoint is at frame 24 -> 4.8 ps
    assert state.getTime().value_in_unit(u.picosecond) == pytest.approx(24 * 0.2)
    assert ckpt["step"] == 24 * 50
    # the DCD header carries the real step interval and first step
    with open(out / "traj.dcd", "rb") as fh:
        head = fh.read(24)
    first, interval = struct.unpack("<ii", head[12:20])
    assert (first, interval) == (50, 50)


def test_rerun_of_finished_run_does_nothing(short_run, tmp_path):
    from training_helpers import run_simulate

    before = (short_run["out"] / "traj.dcd").read_bytes()
    proc = run_simulate(short_run["pdb"], short_run["out"])
    assert "nothing to do" in proc.stderr
    assert (short_run["out"] / "traj.dcd").read_bytes() == before


def test_changed_settings_refused(short_run):
    args = simulate.build_parser().parse_args(
        [str(short_run["pdb"]), "--out", str(short_run["out"]), "--ns", "0.01", "--frame-ps", "0.4"])
    with pytest.raises(simulate.SimulationSetupError, match=r"differs in frame_ps \(0.2 -> 0.4\)"):
        simulate.run(args)


def test_frame_interval_must_be_whole_steps(tmp_path):
    args = simulate.build_parser().parse_args(
        [str(STRUCTURES / "2M9I.pdb"), "--out", str(tmp_path / "x"), "--frame-ps", "0.01"])
    with pytest.raises(simulate.SimulationSetupError, match="not a whole number"):
        simulate.run(args)


def test_truncate_dcd_exact(tmp_path, engrailed_pdb):
    """Write 5 frames with OpenMM's DCDFile, cut to 3, append 2: header and records agree."""
    pdb = app.PDBFile(str(engrailed_pdb))
    pos = pdb.getPositions(asNumpy=True).value_in_unit(u.nanometer)
    path = tmp_path / "t.dcd"
    with open(path, "wb") as fh:
        dcd = app.DCDFile(fh, pdb.topology, 0.004 * u.picosecond, firstStep=10, interval=10)
        for k in range(5):
            dcd.writeModel((pos + 0.01 * k) * u.nanometer)
    simulate.truncate_dcd(str(path), 3, first_step=10, interval=10)
    assert simulate.dcd_layout(str(path))[3] == 3
    with open(path, "r+b") as fh:
        dcd = app.DCDFile(fh, pdb.topology, 0.004 * u.picosecond, firstStep=10, interval=10, append=True)
        for k in (7, 8):
            dcd.writeModel((pos + 0.01 * k) * u.nanometer)
    xyz = md.load_dcd(str(path), top=str(engrailed_pdb)).xyz
    shifts = (xyz - pos[None].astype(np.float32))[:, 0, 0]
    np.testing.assert_allclose(shifts, [0, 0.01, 0.02, 0.07, 0.08], atol=1e-5)
    with pytest.raises(simulate.SimulationSetupError, match="holds 5 complete frames"):
        simulate.truncate_dcd(str(path), 9, first_step=10, interval=10)


def test_help_lists_the_main_options(capsys):
    with pytest.raises(SystemExit):
        simulate.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for opt in ("--forcefield", "--threads", "--frame-ps", "--ns", "--stop-after-frames", "--platform"):
        assert opt in text
