"""Where StarMDIntegrator spends its time: generating frames vs backmapping them.

For three proteins (~10, ~76 and ~200 residues, all from tests/data) this measures

* sampling: seconds per generated frame (one autoregressive step of the sampler, with a history
  of ``--history`` frames in its cache), for the model given by ``--model`` (default: a small
  randomly initialised network of the default architecture, since timings do not depend on the
  weights);
* backmapping: seconds per backmapped frame, ``backmap="vacuum"`` vs ``"system"`` (amber14-all +
  implicit/gbn2 by default), for generated-looking targets: every residue frame moved by a random
  rigid motion of 3° and 0.1 Å per axis (standard deviations), a size typical of 1 ns;

and combines them into the cost per generated frame when all-atom positions are needed only
every ``R`` frames (the reporters' interval): ``sampling + backmap / R``.

Run from a checkout::

    python benchmarks/backmap_speed.py                  # full table (a few minutes on CPU)
    python benchmarks/backmap_speed.py --quick          # 10 and 76 residues, vacuum only
"""
from __future__ import annotations

import argparse
import io
import os
import platform as host_platform
import time
import warnings
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app, unit

from openmm_starmd.backmap import Backmapper, atom_layout
from openmm_starmd.geometry import so3
from openmm_starmd.geometry.frames import frames_from_backbone
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.prepare import prepare_protein
from openmm_starmd.protein import extract_protein

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
PROTEINS = {
    "2K39 1-10": (DATA / "ubiquitin_nmr_2k39_truncated.pdb", None),
    "1UBI": (DATA / "ubiquitin_1ubi.pdb", None),
    "3MHT 1-200": (DATA / "hhai_dna_sah_3mht.pdb", 200),
}


def prepared(path: Path, keep_residues: int | None):
    """Prepared topology and positions; optionally only the first ``keep_residues`` residues."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        protein = prepare_protein(path)
    topology, positions = protein.topology, protein.positions
    if keep_residues is not None:
        modeller = app.Modeller(topology, positions)
        amino = extract_protein(topology, positions).topology_residue_index[:keep_residues]
        keep = set(int(i) for i in amino)
        modeller.delete([r for r in topology.residues() if r.index not in keep])  # DNA and the rest
        # Rebuild hydrogens and the new C terminus (OXT) with PDBFixer.
        modeller.delete([a for a in modeller.topology.atoms() if a.element == app.element.hydrogen])
        from pdbfixer import PDBFixer

        text = io.StringIO()
        app.PDBFile.writeFile(modeller.topology, modeller.positions, text)
        fixer = PDBFixer(pdbfile=io.StringIO(text.getvalue()))
        fixer.findMissingResidues()
        fixer.missingResidues = {}
        fixer.findMissingAtoms()
        fixer.addMissingAtoms(seed=0)
        fixer.addMissingHydrogens(7.0)
        topology, positions = fixer.topology, fixer.positions
    return topology, positions


def target_frames(frames: Rigid, seed: int = 0) -> Rigid:
    g = torch.Generator().manual_seed(seed)
    n = frames.trans.shape[0]
    rot = so3.exp_map(torch.randn(n, 3, generator=g, dtype=torch.float64) * np.deg2rad(3.0))
    return Rigid(rot @ frames.rots, frames.trans + 0.01 * torch.randn(n, 3, generator=g, dtype=torch.float64))


def time_backmap(system, atom_residue, backbone_atoms, x_nm, old, new, mode, repeats, platform_name, properties):
    """(first call s, typical call s, restrained Cα RMSD nm); with ``repeats=0`` the first call
    (which includes building the private Context) is also the typical one."""
    backmapper = Backmapper(
        system, atom_residue, backbone_atoms, mode=mode, platform=platform_name, platform_properties=properties
    )
    t0 = time.perf_counter()
    result = backmapper.backmap(x_nm, old, new, compute_energy=False)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = backmapper.backmap(x_nm, old, new, compute_energy=False)
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)) if times else first, result.restraint_rmsd_nm


def time_sampling(protein, model_path, history, frames, steps):
    """Seconds per generated frame with ``history`` frames already in the cache."""
    from openmm_starmd.sampling import AutoregressiveSampler, SamplingConfig

    network, diffuser = _generator(model_path)
    config = SamplingConfig()
    if steps is not None:
        config.steps = steps
    sampler = AutoregressiveSampler(
        network, diffuser, torch.as_tensor(protein.aatype), torch.as_tensor(protein.residue_index),
        torch.as_tensor(protein.chain_index), torch.as_tensor(protein.mask), dt_ns=1.0, config=config, seed=0,
    )
    sampler.add_history(protein.frames())
    with torch.no_grad():
        if history > 1:
            sampler.generate(history - 1)
        t0 = time.perf_counter()
        sampler.generate(frames)
    return (time.perf_counter() - t0) / frames, config.steps


def _generator(model_path):
    """(network, diffuser): a checkpoint, or the "default" architecture with random weights."""
    if model_path is not None:
        from openmm_starmd.checkpoints import load_model

        loaded = load_model(model_path)
        return loaded.model, loaded.diffuser
    from openmm_starmd.diffusion.se3_diffuser import SE3Diffuser
    from openmm_starmd.model import StarMDNetwork
    from openmm_starmd.model.config import model_config

    torch.manual_seed(0)
    return StarMDNetwork(model_config("default")), SE3Diffuser()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two smallest proteins, vacuum only")
    parser.add_argument("--modes", default="vacuum,system", help="comma-separated backmap modes")
    parser.add_argument("--proteins", default=",".join(PROTEINS), help=f"comma-separated subset of {list(PROTEINS)}")
    parser.add_argument("--forcefield", default="amber14-all.xml,implicit/gbn2.xml")
    parser.add_argument("--repeats", type=int, default=3, help="timed backmaps per protein and mode (vacuum)")
    parser.add_argument("--model", default=None, help="checkpoint to time (default: random small model)")
    parser.add_argument("--history", type=int, default=8, help="frames in the sampler's cache when timing")
    parser.add_argument("--frames", type=int, default=4, help="frames generated for the sampling timing")
    parser.add_argument("--diffusion-steps", type=int, default=None)
    parser.add_argument("--no-sampling", action="store_true", help="skip the sampling timing")
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and OpenMM CPU threads (default: library defaults); 1 is "
                             "steadier on a shared machine")
    parser.add_argument("--intervals", default="1,10,100", help="report intervals R for the combined cost")
    args = parser.parse_args(argv)

    modes = ["vacuum"] if args.quick else args.modes.split(",")
    names = list(PROTEINS)[:2] if args.quick else args.proteins.split(",")
    intervals = [int(r) for r in args.intervals.split(",")]
    forcefield = app.ForceField(*args.forcefield.split(","))
    properties = {}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if args.platform == "CPU":
            properties["Threads"] = str(args.threads)
    print(f"# host: {host_platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{torch.get_num_threads()} torch threads, OpenMM {openmm.__version__} {args.platform}, "
          f"force field {args.forcefield}")
    rows = []
    for name in names:
        path, keep = PROTEINS[name]
        topology, positions = prepared(path, keep)
        protein = extract_protein(topology, positions)
        system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
        atom_residue, backbone_atoms = atom_layout(topology, protein.topology_residue_index)
        x_nm = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
        x = torch.as_tensor(x_nm)
        old = frames_from_backbone(x[backbone_atoms[:, 0]], x[backbone_atoms[:, 1]], x[backbone_atoms[:, 2]])
        new = target_frames(old)
        row = {"protein": name, "residues": len(protein), "atoms": topology.getNumAtoms()}
        if not args.no_sampling:
            row["sample_s"], row["diffusion_steps"] = time_sampling(
                protein, args.model, args.history, args.frames, args.diffusion_steps
            )
        for mode in modes:
            # Full-System minimisation is slow enough that its first call (Context build
            # included, a small share) is the measurement.
            repeats = args.repeats if mode == "vacuum" else 0
            first, per, rmsd = time_backmap(system, atom_residue, backbone_atoms, x_nm, old, new, mode, repeats, args.platform, properties)
            row[f"{mode}_first_s"], row[f"{mode}_s"], row[f"{mode}_rmsd_A"] = first, per, 10 * rmsd
        rows.append(row)
        print(f"# {row}", flush=True)

    print()
    head = "| protein | residues | atoms | sampling s/frame |"
    head += "".join(f" backmap {m} s |" for m in modes)
    head += "".join(f" {m}, R={r}: s/frame |" for m in modes for r in intervals)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        sample = row.get("sample_s", float("nan"))
        line = f"| {row['protein']} | {row['residues']} | {row['atoms']} | {sample:.3f} |"
        line += "".join(f" {row[f'{m}_s']:.2f} |" for m in modes)
        line += "".join(f" {sample + row[f'{m}_s'] / r:.3f} |" for m in modes for r in intervals)
        print(line)
    if rows and "diffusion_steps" in rows[0]:
        print(f"\nSampling: {rows[0]['diffusion_steps']} diffusion steps per frame, {args.history} frames of history. "
              "Backmap times exclude the one-off Context build (first call):")
        for row in rows:
            print(f"- {row['protein']}: " + ", ".join(f"{m} first call {row[f'{m}_first_s']:.2f} s, "
                                                      f"restrained Cα RMSD {row[f'{m}_rmsd_A']:.3f} Å" for m in modes))


if __name__ == "__main__":
    main()
