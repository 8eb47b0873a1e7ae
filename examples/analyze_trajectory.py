"""Read a STAR-MD (or any MD) trajectory with mdtraj and plot Cα RMSD over time and per-residue RMSF.

    python examples/analyze_trajectory.py demo_out/traj.dcd demo_out/prepared.pdb --dt-ns 10
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mdtraj as md  # noqa: E402
import numpy as np  # noqa: E402


def analyze(traj_path, top_path, out_dir, dt_ns: float) -> Path:
    """Cα RMSD to the starting structure and Cα RMSF after superposition; writes rmsd_rmsf.png.

    top_path is the starting structure (e.g. prepared.pdb); as with OpenMM's DCDReporter, the
    trajectory's first frame is taken to be one interval ``dt_ns`` (ns) after it.
    """
    start = md.load(str(top_path))
    traj = md.load(str(traj_path), top=str(top_path))
    ca = traj.topology.select("name CA")
    traj.superpose(start, 0, atom_indices=ca)
    rmsd_nm = md.rmsd(traj, start, 0, atom_indices=ca)
    xyz = traj.xyz[:, ca]  # already superposed on the start by Cα
    rmsf_nm = np.sqrt(((xyz - xyz.mean(0)) ** 2).sum(-1).mean(0))
    time_ns = (np.arange(traj.n_frames) + 1) * dt_ns

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(time_ns, rmsd_nm * 10, marker="o", ms=3)
    a.set(xlabel="time (ns)", ylabel="Cα RMSD to the start (Å)", title="RMSD", xlim=(0, None), ylim=(0, None))
    b.plot(np.arange(1, len(ca) + 1), rmsf_nm * 10)
    b.set(xlabel="residue", ylabel="Cα RMSF (Å)", title="RMSF")
    fig.tight_layout()
    out = Path(out_dir) / "rmsd_rmsf.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"{traj.n_frames} frames: Cα RMSD {rmsd_nm.mean() * 10:.2f} Å mean, {rmsd_nm.max() * 10:.2f} Å max; "
          f"RMSF {rmsf_nm.mean() * 10:.2f} Å mean. Plot: {out}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traj")
    p.add_argument("top")
    p.add_argument("--dt-ns", type=float, required=True, help="time between frames in ns")
    p.add_argument("--out", default=None, help="folder for the PNG (default: beside the trajectory)")
    a = p.parse_args()
    analyze(a.traj, a.top, a.out or Path(a.traj).parent, a.dt_ns)
