"""Long-horizon stability: validity per time block of long STAR-MD rollouts (evaluation, benchmark 2).

The issue's criterion: 1 μs rollouts (1,000 frames at Δt = 1 ns) on the test proteins and a 10 μs
rollout on one; Cα and combined validity per 100 ns block; no block may fall below the first.

For each protein the prepared starting structure (``prepare_protein`` with the plan's options, as
``starmd run`` does) is the one history frame; the model then generates ``--time-ns`` / ``--dt-ns``
frames. Per block of ``--block-ns``:

- **Cα validity**: fraction of *every* generated frame with no Cα clash and no chain break
  (:func:`openmm_starmd.analysis.validity.ca_validity`, CA_CLASH_NM / CA_BREAK_NM, genuine gaps of
  the starting structure exempt, as ``starmd evaluate`` does);
- **combined validity**: fraction of the all-atom frames, one every ``--backmap-every-ns``, that are
  Cα-valid AND all-atom valid (peptide bonds, heavy-atom clashscore, Ramachandran and rotamer
  outliers, :func:`openmm_starmd.analysis.stereochemistry.allatom_validity`). The all-atom
  thresholds are fitted, as in ``starmd evaluate``, on the 99th percentiles of the protein's
  reference MD (``<md-root>/<protein>/r0``); without one, the starting structure stands in for the
  oracle: the library default peptide-bond limit (0.140 nm, or the start's longest), and no more
  clashes and Ramachandran/rotamer outliers than the start has, judged only with dihedral
  densities that do not come from the reference (the analysis package's bundled library). The
  JSON and the printed header say which, and how the prepared start and the other MD replica
  score under the same criteria (the ceiling to read the model's numbers against);
- **median potential energy** (kJ/mol) of the all-atom frames under the run's System (default
  amber14 + GBn2, as ``starmd run``), next to the reference MD's median under the same System;
- **strained**: how many all-atom frames of the block the backmapper flagged as strained beyond
  repair (two atoms closer than 0.3 Å, or a disulfide stretched beyond 2.3 Å);
- the criterion **"no block below the first"** (within ``--tolerance``) for both validities.

How frames are made: the script drives :class:`~openmm_starmd.sampling.AutoregressiveSampler`
(window KV cache) and :class:`~openmm_starmd.backmap.Backmapper` directly rather than going
through ``StarMDIntegrator`` in a ``Simulation``: it needs the Cα trace of every frame, the
potential energy of each backmapped frame (which the Backmapper returns for free), separate
timings for sampling and backmapping, and exact resumption from the sampler's ``state_dict``.
Backmapping follows the integrator exactly: each all-atom frame is transported from the previous
all-atom frame (the starting structure first) and minimised under restraints (``--backmap``,
default vacuum).

Resuming: after every block (and every backmapped frame batch that ends a block) the sampler
state, the last all-atom positions and all per-frame results are saved in
``<out>/<protein>/state.npz``; rerunning the same command continues where it stopped, and a
larger ``--time-ns`` extends a finished run (1 μs → 10 μs). The summary (``long_horizon.json``,
``.md``, ``.png``) is rewritten after every block. ``--fresh`` starts over.

    python benchmarks/long_horizon.py                                  # 1 μs, the test proteins
    python benchmarks/long_horizon.py --protein villin_hp35 --time-ns 10000
    python benchmarks/long_horizon.py --protein 2M9I --time-ns 20 --block-ns 10 --backmap-every-ns 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import torch
from openmm import app, unit
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openmm_starmd.analysis.stereochemistry import (DihedralReference, allatom_validity,  # noqa: E402
                                                    fit_allatom_criteria)
from openmm_starmd.analysis.validity import (CA_BREAK_NM, CA_CLASH_NM, broken_pairs,  # noqa: E402
                                             ca_validity)
from openmm_starmd.analysis.alignment import ca_indices  # noqa: E402
from openmm_starmd.backmap import BACKMAP_MODES, Backmapper, BackmapError, atom_layout  # noqa: E402
from openmm_starmd.checkpoints import bundled_model_path, load_model  # noqa: E402
from openmm_starmd.data import sha256_file  # noqa: E402
from openmm_starmd.geometry.frames import frames_from_backbone  # noqa: E402
from openmm_starmd.geometry.rigid import Rigid  # noqa: E402
from openmm_starmd.prepare import prepare_protein  # noqa: E402
from openmm_starmd.protein import disulfide_bounds, extract_protein  # noqa: E402
from openmm_starmd.sampling import AutoregressiveSampler  # noqa: E402

TRAINING = ROOT / "training"
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "long_horizon"
DEFAULT_FF = ("amber14-all.xml", "implicit/gbn2.xml")
STATE_FORMAT = "long-horizon-state/1"


# --------------------------------------------------------------------------- inputs
def default_proteins(plan: dict, manifest_path: Path) -> list[str]:
    """Test proteins: the test split of training/plan.json and of the data manifest, plan order first."""
    names = [n for n, e in plan.get("proteins", {}).items() if e.get("split") == "test"]
    if manifest_path.is_file():
        with open(manifest_path) as fh:
            shards = json.load(fh).get("shards", [])
        names += sorted({s["protein"] for s in shards if s.get("split") == "test"} - set(names))
    return names


def structure_of(name: str, plan: dict) -> tuple[Path, dict]:
    """Starting-structure file of a protein and its prepare_protein options (from plan.json)."""
    entry = plan.get("proteins", {}).get(name)
    if entry is not None:
        return TRAINING / entry["file"], dict(entry.get("prepare_options", {}))
    found = sorted((TRAINING / "structures").glob(f"{name}.*"))
    if not found:
        raise SystemExit(f"long_horizon: protein {name!r} is neither in training/plan.json nor in "
                         "training/structures/; pass a name listed there.")
    return found[0], {}




def pick_platform(name: str, threads: int) -> tuple[openmm.Platform, dict]:
    """OpenMM platform and properties for the backmapper ("auto": CUDA if present, else CPU)."""
    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name == "auto":
        name = "CUDA" if "CUDA" in names else "CPU"
    if name not in names:
        raise SystemExit(f"long_horizon: OpenMM platform {name!r} is not available here ({names}); pick one of those.")
    props = {"Threads": str(threads)} if name == "CPU" else {}
    return openmm.Platform.getPlatformByName(name), props


# --------------------------------------------------------------------------- one protein's set-up

def _allatom_md(run: Path):
    """All-atom MD of one run on this machine: its checkpointed frames, or the sample committed
    with its MD state (training/restore_md.py ``allatom_md``); None if there is none."""
    import sys

    sys.path.insert(0, str(ROOT / "training"))
    import restore_md  # noqa: E402

    return restore_md.allatom_md(str(run))

class ProteinSetup:
    """Everything fixed for one protein: structure, System, backmapper, topologies, criteria.

    Attributes
    ----------
    positions_nm : np.ndarray, shape=(n_atoms, 3), nm
        Prepared starting structure.
    backbone_atoms : np.ndarray, shape=(N, 3), int
        N, CA, C atom indices of each residue frame.
    top_aa, top_ca : mdtraj.Topology
        All-atom topology and its Cα-only subset (in frame order).
    ca_gaps : np.ndarray, shape=(n, 2), int
        Consecutive Cα pairs already broken in the starting structure (exempt).
    criteria : AllAtomCriteria
    reference : dict
        What the all-atom thresholds were fitted on, and the reference MD energies.
    """

    def __init__(self, name: str, args, platform, props):
        self.name = name
        self.structure, options = structure_of(name, args.plan_data)
        prepared = prepare_protein(self.structure, **options)
        self.prepare_options = options
        self.topology = prepared.topology
        self.positions_nm = np.asarray(prepared.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        self.system = app.ForceField(*args.forcefield).createSystem(self.topology)
        self.protein = extract_protein(self.topology, prepared.positions)
        atom_residue, self.backbone_atoms = atom_layout(self.topology, self.protein.topology_residue_index)
        self.backmapper = Backmapper(self.system, atom_residue, self.backbone_atoms, mode=args.backmap,
                                     platform=platform, platform_properties=props)
        self.top_aa = md.Topology.from_openmm(self.topology)
        ca = ca_indices(self.top_aa)
        if not np.array_equal(ca, self.backbone_atoms[:, 1]):
            raise SystemExit(f"long_horizon: {name}: the Cα atoms of the topology ({len(ca)}) do not match the "
                             f"model's residue frames ({len(self.backbone_atoms)}); the structure has protein "
                             "residues without a frame, which this benchmark does not support.")
        self.top_ca = self.top_aa.subset(ca)
        start = md.Trajectory(self.positions_nm[None].astype(np.float32), self.top_aa)
        self.ca_gaps = broken_pairs(start, 0)
        self.criteria, self.reference = self._criteria(args, start)
        self.reference["ceiling"] = self._ceiling(args, start)

    def _criteria(self, args, start: md.Trajectory):
        """All-atom criteria from the reference MD (or the fallback) and a description of them."""
        run = Path(args.md_root) / self.name / f"r{args.reference_replica}"
        found = _allatom_md(run)
        if found is not None:
            dcd, top, n, what = found
            with md.open(str(dcd)) as fh:
                ref = fh.read_as_traj(md.load_topology(str(top)), n_frames=n)
            if len(ca_indices(ref.topology)) == len(self.backbone_atoms):
                settings = {}
                if (run / "record.json").is_file():
                    settings = json.loads((run / "record.json").read_text()).get("settings", {})
                frame_ps = settings.get("frame_ps")
                info = {
                    "source": "reference MD", "path": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
                    "frames": int(ref.n_frames), "frame_ps": frame_ps, "which": what,
                    "time_ns": None if frame_ps is None else ref.n_frames * frame_ps / 1000.0,
                    "forcefield": settings.get("forcefield_files"),
                    "note": "all-atom thresholds = 99th percentiles of this MD (fit_allatom_criteria)",
                }
                info.update(self._reference_energies(ref))
                criteria = fit_allatom_criteria(ref)
                source = criteria.as_dict().get("dihedral_density_source")
                if source:
                    info["note"] += f"; (φ, ψ)/χ densities: {source}"
                return criteria, info
        where = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
        criteria, dihedral_note = self._fallback_criteria(start)
        info = {"source": "no reference MD", "path": None, "frames": 0,
                "note": f"no {where}/traj.dcd, so the prepared start stands in for the oracle: peptide bond <= "
                        "max(0.140 nm library default, the start's longest), clashscore <= the start's, "
                        + dihedral_note,
                "median_energy_kj_mol": None}
        return criteria, info

    @staticmethod
    def _fallback_criteria(start: md.Trajectory):
        """Criteria with the starting structure as a one-frame oracle, and what that means for dihedrals.

        Densities fitted on one structure mean nothing, so only densities that do not come from
        the reference (a bundled library, where the analysis package has one) are kept; the
        per-frame outlier limits are then the start's own outlier fractions.
        """
        criteria = fit_allatom_criteria(start)
        d = criteria.dihedrals
        rama_src, rot_src = getattr(d, "rama_source", None), getattr(d, "rotamer_source", None)
        if rama_src is None or rot_src is None:  # densities can only come from the reference here
            criteria.dihedrals = DihedralReference()
            criteria.max_rama_fraction = criteria.max_rotamer_fraction = 0.0  # nothing judged: fractions are 0
            return criteria, "Ramachandran and rotamer outliers not judged"
        for table, src in ((d.rama, rama_src), (d.rotamer, rot_src)):
            for key in [k for k, v in src.items() if v == "reference"]:
                table.pop(key, None)
                src.pop(key, None)
        if not d.rama and not d.rotamer:
            criteria.max_rama_fraction = criteria.max_rotamer_fraction = 0.0
            return criteria, "Ramachandran and rotamer outliers not judged (no densities independent of a reference)"
        v = allatom_validity(start, criteria)
        criteria.max_rama_fraction = float(v.rama_fraction[0])
        criteria.max_rotamer_fraction = float(v.rotamer_fraction[0])
        return criteria, ("Ramachandran / rotamer outliers judged with the non-reference densities only "
                          f"({d.describe().get('dihedral_density_source')}), a frame may have as many as the start")

    def _score(self, traj: md.Trajectory) -> dict:
        """Cα, all-atom (and each all-atom check's) and combined validity fractions of ``traj``."""
        ca = ca_validity(traj, ignore_pairs=self.ca_gaps).valid
        aa = allatom_validity(traj, self.criteria)
        out = {"frames": int(traj.n_frames), "ca_validity": float(ca.mean()),
               "combined_validity": float((ca & aa.valid).mean())}
        out.update({k: float(np.mean(getattr(aa, k))) for k in ("peptide_ok", "clash_ok", "rama_ok", "rotamer_ok")})
        return out

    def _ceiling(self, args, start: md.Trajectory) -> dict:
        """What the same criteria say of real structures: the prepared start and another MD replica.

        A criterion that fails real MD measures the reference, not the model (e.g. rotamer densities
        fitted on a short reference MD are too narrow), so these numbers are the ceiling to read the
        model's against.
        """
        out = {"start": self._score(start)}
        folder = Path(args.md_root) / self.name
        for run in sorted(folder.glob("r*")) if folder.is_dir() else []:
            found = _allatom_md(run) if run.is_dir() and run.name != f"r{args.reference_replica}" else None
            if found is None:
                continue
            try:
                with md.open(str(found[0])) as fh:
                    other = fh.read_as_traj(md.load_topology(str(found[1])), n_frames=found[2])
            except (OSError, ValueError):
                continue
            if [a.element.symbol for a in other.topology.atoms] == [a.element.symbol for a in self.top_aa.atoms]:
                out["other_replica"] = {"path": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
                                        **self._score(other)}
                break
        return out

    def _reference_energies(self, ref: md.Trajectory) -> dict:
        """Median and 99th percentile of the reference MD's potential energy under this run's System."""
        mine = [a.element.symbol for a in self.top_aa.atoms]
        if [a.element.symbol for a in ref.topology.atoms] != mine:
            return {"median_energy_kj_mol": None,
                    "energy_note": "reference atoms differ from the prepared structure; no reference energies"}
        context = openmm.Context(self.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                                 {"Threads": "1"})
        e = []
        for xyz in ref.xyz:
            context.setPositions(xyz.astype(np.float64))
            e.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        return {"median_energy_kj_mol": float(np.median(e)), "p99_energy_kj_mol": float(np.percentile(e, 99))}

    def frames_of(self, positions_nm: np.ndarray) -> Rigid:
        """Residue frames (N,) in float64 of all-atom positions (n_atoms, 3) nm."""
        x = torch.as_tensor(positions_nm, dtype=torch.float64)
        bb = self.backbone_atoms
        return frames_from_backbone(x[bb[:, 0]], x[bb[:, 1]], x[bb[:, 2]])


# --------------------------------------------------------------------------- state on disk
def _save_npz(path: Path, arrays: dict, meta: dict) -> None:
    """Write arrays plus a JSON meta record atomically."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __meta__=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


class RunState:
    """Per-frame results of one protein's rollout, and what is needed to resume it.

    Attributes
    ----------
    ca_valid : list of bool, one per generated frame (as kept: after the Cα projection when it is on)
    raw_ca_valid : list of bool, one per generated frame: the network's own frame, before any projection
    ca_nm : list of np.ndarray (N, 3) float32, one per generated frame, nm
    bm_frame : list of int, generated-frame number (1-based) of each all-atom frame
    bm_ca_valid, bm_aa_valid : list of bool
    bm_energy : list of float, kJ/mol (NaN if the backmap failed)
    bm_strained : list of bool, the Backmapper flagged the frame as strained (atoms < 0.3 Å apart or
        a disulfide stretched beyond 2.3 Å)
    bm_xyz : list of np.ndarray (n_atoms, 3) float32, nm
    aa_nm : np.ndarray (n_atoms, 3) float64, nm — the latest all-atom positions
    timing : dict of accumulated seconds
    stopped : str or None — why the rollout ended early (model divergence)
    """

    def __init__(self, start_nm: np.ndarray):
        self.ca_valid, self.ca_nm, self.raw_ca_valid = [], [], []
        self.bm_frame, self.bm_ca_valid, self.bm_aa_valid, self.bm_energy, self.bm_xyz = [], [], [], [], []
        self.bm_strained = []
        self.bm_failures = []
        self.aa_nm = start_nm.copy()
        self.timing = {"sampling_s": 0.0, "backmap_s": 0.0, "scoring_s": 0.0}
        self.stopped = None

    @property
    def frames(self) -> int:
        """Generated frames so far."""
        return len(self.ca_valid)

    def save(self, path: Path, sampler: AutoregressiveSampler, fingerprint: dict) -> None:
        """Write the state and the sampler's resume state to ``path`` (.npz)."""
        sampler_state = sampler.state_dict()
        arrays = {f"sampler/{k}": v for k, v in sampler_state.items() if isinstance(v, np.ndarray)}
        sampler_meta = {k: v for k, v in sampler_state.items() if not isinstance(v, np.ndarray)}
        n_atoms = len(self.aa_nm)
        n_res = sampler.n_residues
        arrays.update({
            "ca_valid": np.array(self.ca_valid, dtype=bool),
            "raw_ca_valid": np.array(self.raw_ca_valid, dtype=bool),
            "ca_nm": np.array(self.ca_nm, dtype=np.float32).reshape(-1, n_res, 3),
            "bm_frame": np.array(self.bm_frame, dtype=np.int64),
            "bm_ca_valid": np.array(self.bm_ca_valid, dtype=bool),
            "bm_aa_valid": np.array(self.bm_aa_valid, dtype=bool),
            "bm_energy": np.array(self.bm_energy, dtype=np.float64),
            "bm_strained": np.array(self.bm_strained, dtype=bool),
            "bm_xyz": np.array(self.bm_xyz, dtype=np.float32).reshape(-1, n_atoms, 3),
            "aa_nm": self.aa_nm,
        })
        meta = {"format": STATE_FORMAT, "fingerprint": fingerprint, "sampler": sampler_meta,
                "timing": self.timing, "stopped": self.stopped, "bm_failures": self.bm_failures}
        _save_npz(path, arrays, meta)

    @classmethod
    def load(cls, path: Path, sampler: AutoregressiveSampler, fingerprint: dict) -> "RunState":
        """Read a state written by :meth:`save` and restore the sampler; raises SystemExit on mismatch."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            if meta.get("format") != STATE_FORMAT:
                raise SystemExit(f"long_horizon: {path} is not a state file of this script; remove it or pass --fresh.")
            if meta["fingerprint"] != fingerprint:
                diff = sorted(k for k in set(meta["fingerprint"]) | set(fingerprint)
                              if meta["fingerprint"].get(k) != fingerprint.get(k))
                raise SystemExit(f"long_horizon: {path} was made with different settings ({', '.join(diff)}); "
                                 "rerun with the same ones, pass --fresh to start over, or use another --out.")
            state = cls(z["aa_nm"])
            state.ca_valid = z["ca_valid"].tolist()
            # states from before the projection existed: the kept frames were the network's own
            state.raw_ca_valid = z["raw_ca_valid"].tolist() if "raw_ca_valid" in z.files else list(state.ca_valid)
            state.ca_nm = list(z["ca_nm"])
            state.bm_frame = z["bm_frame"].tolist()
            state.bm_ca_valid = z["bm_ca_valid"].tolist()
            state.bm_aa_valid = z["bm_aa_valid"].tolist()
            state.bm_energy = z["bm_energy"].tolist()
            # states written before the strained flag was recorded: unknown, counted as not strained
            state.bm_strained = (z["bm_strained"].tolist() if "bm_strained" in z.files
                                 else [False] * len(state.bm_frame))
            state.bm_xyz = list(z["bm_xyz"])
            sampler_state = dict(meta["sampler"])
            sampler_state.update({k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("sampler/")})
        state.timing = meta["timing"]
        state.stopped = meta["stopped"]
        state.bm_failures = meta.get("bm_failures", [])
        sampler.load_state_dict(sampler_state)
        return state


# --------------------------------------------------------------------------- the rollout
def make_sampler(loaded, setup: ProteinSetup, args) -> AutoregressiveSampler:
    """A one-replica sampler for the protein, seeded from (--seed, protein name)."""
    import dataclasses

    config = loaded.sampling_config
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    p = setup.protein
    seed = int(np.random.SeedSequence([args.seed, zlib.crc32(setup.name.encode())]).generate_state(1, np.uint64)[0] >> 1)
    return AutoregressiveSampler(loaded.model, loaded.diffuser, torch.as_tensor(p.aatype),
                                 torch.as_tensor(p.residue_index), torch.as_tensor(p.chain_index),
                                 torch.as_tensor(p.mask), dt_ns=args.dt_ns, config=config, seed=seed,
                                 device=args.torch_device,
                                 pair_bounds=disulfide_bounds(setup.topology, p.topology_residue_index),
                                 ca_geometry=args.ca_geometry)


def generate(sampler: AutoregressiveSampler, setup: ProteinSetup, state: RunState, n: int) -> Rigid | None:
    """Generate ``n`` frames, score their Cα validity into ``state``; None (and ``state.stopped``) on divergence.

    Returns the last generated frame, (N,) Rigid float64 nm.
    """
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out, raw = sampler.generate(n, return_raw=True)
    except FloatingPointError as exc:
        state.timing["sampling_s"] += time.perf_counter() - t0
        state.stopped = f"model produced NaN/Inf after frame {state.frames}: {exc}"
        return None
    state.timing["sampling_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    ca = out.trans[0].detach().double().cpu().numpy()  # (n, N, 3)
    valid = ca_validity(md.Trajectory(ca.astype(np.float32), setup.top_ca), ignore_pairs=setup.ca_gaps).valid
    state.ca_valid += valid.tolist()
    raw_ca = raw.trans[0].detach().float().cpu().numpy()
    state.raw_ca_valid += ca_validity(md.Trajectory(raw_ca, setup.top_ca), ignore_pairs=setup.ca_gaps).valid.tolist()
    state.ca_nm += list(ca.astype(np.float32))
    state.timing["scoring_s"] += time.perf_counter() - t0
    return Rigid(out.rots[0, -1].double().cpu(), out.trans[0, -1].double().cpu())


def backmap(setup: ProteinSetup, state: RunState, new: Rigid) -> None:
    """Backmap the latest generated frame from the previous all-atom frame; score it into ``state``."""
    t0 = time.perf_counter()
    strained_before = setup.backmapper.strained_frames
    try:
        res = setup.backmapper.backmap(state.aa_nm, setup.frames_of(state.aa_nm), new, frame_index=state.frames,
                                       compute_energy=True)
    except BackmapError as exc:  # an unbackmappable frame is invalid; the next one starts from the last good one
        state.timing["backmap_s"] += time.perf_counter() - t0
        state.bm_failures.append(f"frame {state.frames}: {exc}")
        state.bm_frame.append(state.frames)
        state.bm_ca_valid.append(False)
        state.bm_aa_valid.append(False)
        state.bm_energy.append(float("nan"))
        state.bm_strained.append(False)
        state.bm_xyz.append(state.aa_nm.astype(np.float32))
        return
    state.timing["backmap_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    traj = md.Trajectory(res.positions_nm[None].astype(np.float32), setup.top_aa)
    ca_ok = bool(ca_validity(traj, ignore_pairs=setup.ca_gaps).valid[0])
    aa_ok = bool(allatom_validity(traj, setup.criteria).valid[0])
    state.timing["scoring_s"] += time.perf_counter() - t0
    state.aa_nm = res.positions_nm
    state.bm_frame.append(state.frames)
    state.bm_ca_valid.append(ca_ok)
    state.bm_aa_valid.append(aa_ok)
    state.bm_energy.append(float(res.potential_energy_kj))
    state.bm_strained.append(setup.backmapper.strained_frames > strained_before)
    state.bm_xyz.append(res.positions_nm.astype(np.float32))


# --------------------------------------------------------------------------- summaries
def _fraction(x) -> float | None:
    return float(np.mean(x)) if len(x) else None


def block_table(state: RunState, args) -> list[dict]:
    """Per-block results of the frames generated so far (complete blocks and the current partial one)."""
    per = args.block_frames
    ca = np.array(state.ca_valid, dtype=bool)
    raw = np.array(state.raw_ca_valid, dtype=bool)
    bm = np.array(state.bm_frame, dtype=np.int64)
    bm_ca = np.array(state.bm_ca_valid, dtype=bool)
    bm_aa = np.array(state.bm_aa_valid, dtype=bool)
    e = np.array(state.bm_energy, dtype=np.float64)
    strained = np.array(state.bm_strained, dtype=bool)
    rows = []
    for b in range(math.ceil(len(ca) / per)):
        lo, hi = b * per, min((b + 1) * per, len(ca))  # generated frames lo+1 .. hi
        sel = (bm > lo) & (bm <= hi)
        finite = e[sel][np.isfinite(e[sel])]
        rows.append({
            "start_ns": lo * args.dt_ns, "end_ns": hi * args.dt_ns, "frames": hi - lo, "complete": hi - lo == per,
            "ca_validity": _fraction(ca[lo:hi]),
            "raw_ca_validity": _fraction(raw[lo:hi]),
            "backmapped_frames": int(sel.sum()),
            "ca_validity_backmapped": _fraction(bm_ca[sel]),
            "allatom_validity": _fraction(bm_aa[sel]),
            "combined_validity": _fraction(bm_ca[sel] & bm_aa[sel]),
            "median_energy_kj_mol": float(np.median(finite)) if len(finite) else None,
            "strained_frames": int(strained[sel].sum()),
        })
    return rows


def criterion(rows: list[dict], key: str, tolerance: float) -> dict:
    """"No block below the first" on complete blocks: pass, first value, lowest later value and where."""
    vals = [(r["start_ns"], r[key]) for r in rows if r["complete"] and r[key] is not None]
    if len(vals) < 2:
        return {"pass": None, "first": vals[0][1] if vals else None, "min_later": None, "min_later_start_ns": None,
                "note": "fewer than two complete blocks"}
    first = vals[0][1]
    t_min, v_min = min(vals[1:], key=lambda tv: tv[1])
    return {"pass": bool(v_min >= first - tolerance), "first": first, "min_later": v_min, "min_later_start_ns": t_min,
            "vacuous": first == 0}


def protein_summary(setup: ProteinSetup, state: RunState, args, target_frames: int) -> dict:
    """The JSON record of one protein."""
    rows = block_table(state, args)
    n_bm = len(state.bm_frame)
    ca_crit = criterion(rows, "ca_validity", args.tolerance)
    raw_crit = criterion(rows, "raw_ca_validity", args.tolerance)
    comb_crit = criterion(rows, "combined_validity", args.tolerance)
    if state.stopped:
        for c in (ca_crit, raw_crit, comb_crit):
            c["pass"] = False
            c["note"] = "rollout stopped early: " + state.stopped
    t = state.timing
    return {
        "structure": str(setup.structure.relative_to(ROOT)), "prepare_options": setup.prepare_options,
        "residues": int(len(setup.backbone_atoms)), "atoms": int(setup.topology.getNumAtoms()),
        "dt_ns": args.dt_ns, "block_ns": args.block_ns, "time_ns_target": target_frames * args.dt_ns,
        "frames_done": state.frames, "frames_target": target_frames, "backmapped_frames": n_bm,
        "status": "stopped" if state.stopped else ("complete" if state.frames >= target_frames else "running"),
        "stopped": state.stopped, "backmap_failures": state.bm_failures,
        "reference": setup.reference,
        "thresholds": {"ca_clash_nm": CA_CLASH_NM, "ca_break_nm": CA_BREAK_NM,
                       "ca_gap_pairs_exempt": setup.ca_gaps.tolist(), **setup.criteria.as_dict()},
        "blocks": rows,
        "criterion": {"ca_validity": ca_crit, "raw_ca_validity": raw_crit, "combined_validity": comb_crit},
        "overall": {"ca_validity": _fraction(state.ca_valid), "raw_ca_validity": _fraction(state.raw_ca_valid),
                    "combined_validity": _fraction(np.array(state.bm_ca_valid, bool) & np.array(state.bm_aa_valid, bool))},
        "timing": {**t,
                   "sampling_s_per_frame": t["sampling_s"] / state.frames if state.frames else None,
                   "backmap_s_per_backmapped_frame": t["backmap_s"] / n_bm if n_bm else None,
                   "scoring_s_per_frame": t["scoring_s"] / state.frames if state.frames else None,
                   "total_s_per_frame": sum(t.values()) / state.frames if state.frames else None},
    }


def _f(x, fmt=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _verdict(c: dict) -> str:
    if c["pass"] is None:
        return "n/a (" + c.get("note", "") + ")"
    text = "PASS" if c["pass"] else "FAIL"
    if c["pass"] and c["first"] == 0:
        text += ", vacuous: the first block is already 0"
    return f"{text} (first {_f(c['first'])}, lowest later {_f(c['min_later'])} at {_f(c['min_later_start_ns'], 'g')} ns)"


def describe_reference(ref: dict) -> str:
    """One sentence on what the all-atom thresholds were fitted on (and the reference energy)."""
    text = ref["source"]
    if ref.get("path"):
        span = f", {ref['time_ns']:g} ns" if ref.get("time_ns") else ""
        ff = f", {' + '.join(ref['forcefield'])}" if ref.get("forcefield") else ""
        text += f" {ref['path']} ({ref['frames']} frames{span}{ff})"
    text += f": {ref['note']}"
    if ref.get("median_energy_kj_mol") is not None:
        text += f"; its median energy under this run's System is {ref['median_energy_kj_mol']:.4g} kJ/mol"
    ceiling = ref.get("ceiling", {})
    parts = []
    if "start" in ceiling:
        parts.append(f"the prepared start is {'valid' if ceiling['start']['combined_validity'] == 1 else 'INVALID'}"
                     + _failed_checks(ceiling["start"]))
    if "other_replica" in ceiling:
        o = ceiling["other_replica"]
        parts.append(f"MD {o['path']} ({o['frames']} frames) scores Cα {o['ca_validity']:.2f}, combined "
                     f"{o['combined_validity']:.2f}" + _failed_checks(o))
    if parts:
        text += ". Ceiling under these criteria: " + "; ".join(parts)
    return text


def _failed_checks(score: dict) -> str:
    """' (rotamer_ok 0.03, ...)' for the all-atom checks that fail in some frames, else ''."""
    bad = [f"{k} {score[k]:.2f}" for k in ("peptide_ok", "clash_ok", "rama_ok", "rotamer_ok") if score[k] < 1]
    return f" ({', '.join(bad)})" if bad else ""


def markdown(name: str, rec: dict) -> str:
    """One protein's Markdown table and verdict lines."""
    head = (f"**{name}** ({rec['residues']} residues, {rec['atoms']} atoms; {rec['frames_done']}/{rec['frames_target']} "
            f"frames, {rec['status']}). All-atom thresholds: {describe_reference(rec['reference'])}.")
    lines = [head, "", "| block (ns) | Cα validity | network's own Cα validity | combined validity (n) | "
                       "median energy (kJ/mol) | strained |",
             "|---|---|---|---|---|---|"]
    for r in rec["blocks"]:
        mark = "" if r["complete"] else " (partial)"
        lines.append(f"| {r['start_ns']:g}–{r['end_ns']:g}{mark} | {_f(r['ca_validity'])} | "
                     f"{_f(r.get('raw_ca_validity'))} | "
                     f"{_f(r['combined_validity'])} ({r['backmapped_frames']}) | {_f(r['median_energy_kj_mol'], '.4g')} | "
                     f"{r.get('strained_frames', '–')} |")
    c = rec["criterion"]
    raw = f"network's own Cα {_verdict(c['raw_ca_validity'])}; " if "raw_ca_validity" in c else ""
    lines += ["", f"No block below the first: Cα {_verdict(c['ca_validity'])}; {raw}"
                  f"combined {_verdict(c['combined_validity'])}."]
    t = rec["timing"]
    lines.append(f"Time: sampling {_f(t['sampling_s_per_frame'], '.3f')} s/frame, backmapping "
                 f"{_f(t['backmap_s_per_backmapped_frame'], '.3f')} s per all-atom frame, scoring "
                 f"{_f(t['scoring_s_per_frame'], '.3f')} s/frame; "
                 f"total {_f(t['total_s_per_frame'], '.3f')} s per generated frame.")
    if rec["backmap_failures"]:
        lines.append(f"Backmapping failed on {len(rec['backmap_failures'])} frame(s), counted invalid with no energy: "
                     + "; ".join(rec["backmap_failures"][:3]) + (" ..." if len(rec["backmap_failures"]) > 3 else ""))
    if rec["stopped"]:
        lines.append(f"Stopped early: {rec['stopped']}")
    return "\n".join(lines)


def plot(path: Path, results: dict, title: str) -> None:
    """Validity vs time: one colour per protein, Cα solid, combined dashed (block midpoints)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for i, (name, rec) in enumerate(results.items()):
        rows = [r for r in rec["blocks"] if r["complete"]] or rec["blocks"]
        mid = np.array([(r["start_ns"] + r["end_ns"]) / 2 for r in rows])
        colour = f"C{i}"
        ca = np.array([np.nan if r["ca_validity"] is None else r["ca_validity"] for r in rows])
        comb = np.array([np.nan if r["combined_validity"] is None else r["combined_validity"] for r in rows])
        ax.plot(mid, ca, "-o", color=colour, ms=3, label=f"{name} Cα")
        ax.plot(mid, comb, "--s", color=colour, ms=3, label=f"{name} combined")
        raw = np.array([np.nan if r.get("raw_ca_validity") is None else r["raw_ca_validity"] for r in rows])
        if not np.allclose(raw, ca, equal_nan=True):
            ax.plot(mid, raw, ":", color=colour, label=f"{name} Cα, network's own")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("time (ns, block midpoint)")
    ax.set_ylabel("fraction valid")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)


def write_trajectories(folder: Path, setup: ProteinSetup, state: RunState, dt_ns: float, every_ns: float) -> None:
    """prepared.pdb, traj_ca.dcd (every frame) and traj_aa.dcd (all-atom frames) for ``starmd evaluate``."""
    if not (folder / "prepared.pdb").exists():
        with open(folder / "prepared.pdb", "w") as fh:
            app.PDBFile.writeFile(setup.topology, setup.positions_nm * unit.nanometer, fh, keepIds=True)
    ps = 1000.0
    if state.ca_nm:
        md.Trajectory(np.stack(state.ca_nm), setup.top_ca,
                      time=np.arange(1, state.frames + 1) * dt_ns * ps).save_dcd(str(folder / "traj_ca.dcd"))
    if state.bm_xyz:
        md.Trajectory(np.stack(state.bm_xyz), setup.top_aa,
                      time=np.array(state.bm_frame) * dt_ns * ps).save_dcd(str(folder / "traj_aa.dcd"))


def write_summary(out: Path, results: dict, meta: dict) -> None:
    """long_horizon.json, long_horizon.md and long_horizon.png (atomically, each time a block ends)."""
    record = {**meta, "proteins": results}
    tmp = out / "long_horizon.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=float))
    os.replace(tmp, out / "long_horizon.json")
    text = "\n\n".join(markdown(n, r) for n, r in results.items()) + "\n"
    (out / "long_horizon.md.tmp").write_text(text)
    os.replace(out / "long_horizon.md.tmp", out / "long_horizon.md")
    plot(out / "long_horizon.png", results, f"STAR-MD long-horizon validity ({meta['model']['name']}, "
         f"Δt {meta['settings']['dt_ns']:g} ns)")


# --------------------------------------------------------------------------- driver
def run_protein(name: str, loaded, args, platform, props, results: dict, meta: dict) -> dict:
    """Roll out one protein to --time-ns (resuming if a state exists), checkpointing after every block."""
    setup = ProteinSetup(name, args, platform, props)
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.npz"
    fingerprint = {**args.fingerprint, "protein": name, "structure_sha256": sha256_file(setup.structure),
                   "prepare_options": setup.prepare_options}
    sampler = make_sampler(loaded, setup, args)
    target = args.total_frames
    if state_path.exists() and not args.fresh:
        state = RunState.load(state_path, sampler, fingerprint)
        print(f"{name}: resuming from {state.frames} frames ({state.frames * args.dt_ns:g} ns) in {state_path}",
              flush=True)
    else:
        state = RunState(setup.positions_nm)
        start = setup.frames_of(setup.positions_nm)
        sampler.add_history(Rigid(start.rots.float(), start.trans.float()))

    bar = tqdm(total=target, initial=min(state.frames, target), unit="frame", desc=name, dynamic_ncols=True)
    try:
        while state.frames < target and not state.stopped:
            f = state.frames
            # generate up to the next all-atom frame, block end or the end, whichever comes first
            nxt = min(target, (f // args.every_frames + 1) * args.every_frames,
                      (f // args.block_frames + 1) * args.block_frames)
            last = generate(sampler, setup, state, nxt - f)
            bar.update(state.frames - f)
            if last is None:
                break
            if state.frames % args.every_frames == 0:
                backmap(setup, state, last)
            if state.frames % args.block_frames == 0 or state.frames == target:
                state.save(state_path, sampler, fingerprint)
                write_trajectories(folder, setup, state, args.dt_ns, args.backmap_every_ns)
                results[name] = protein_summary(setup, state, args, target)
                write_summary(args.out, results, meta)
                done = [r for r in results[name]["blocks"] if r["complete"]]
                if done:
                    r = done[-1]
                    bar.set_postfix(block=f"{r['start_ns']:g}-{r['end_ns']:g}ns", ca=_f(r["ca_validity"]),
                                    combined=_f(r["combined_validity"]), refresh=False)
    finally:
        bar.close()
    if state.stopped:
        state.save(state_path, sampler, fingerprint)
    results[name] = protein_summary(setup, state, args, target)
    write_summary(args.out, results, meta)
    return results[name]


def earlier_results(path: Path, model_sha: str, proteins: list[str]) -> dict:
    """Records of other proteins from an earlier summary in the same --out made with the same model.

    So a 10 μs run of one protein in the folder of the 1 μs runs keeps their rows in the summary.
    """
    if not path.is_file():
        return {}
    try:
        prev = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if prev.get("model", {}).get("sha256") != model_sha:
        return {}
    return {k: v for k, v in prev.get("proteins", {}).items() if k not in proteins}


def _integer_ratio(a: float, b: float, what: str) -> int:
    k = a / b
    if not (k >= 1 and abs(k - round(k)) < 1e-6):
        raise SystemExit(f"long_horizon: {what} ({a:g} / {b:g} = {k:g}) must be a positive whole number; "
                         "adjust the options.")
    return int(round(k))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="STAR-MD checkpoint (a file written by save_model/export.py); default: the bundled model")
    p.add_argument("--protein", action="append", default=None, metavar="NAME",
                   help="protein to roll out (repeatable); a name of training/plan.json or of training/structures/. "
                        "Default: the test split of training/plan.json and training/data/manifest.json")
    p.add_argument("--time-ns", type=float, default=1000.0, help="rollout length per protein, ns (default 1000 = 1 μs)")
    p.add_argument("--dt-ns", type=float, default=1.0, help="time between generated frames, ns (default 1.0)")
    p.add_argument("--block-ns", type=float, default=100.0, help="length of a validity block, ns (default 100)")
    p.add_argument("--backmap-every-ns", type=float, default=10.0,
                   help="backmap one frame to all atoms every this many ns; those frames give the combined validity "
                        "and energies (default 10, i.e. 10 per 100-ns block)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="a block passes if its validity is at least the first block's minus this (default 0: strict)")
    p.add_argument("--steps", type=int, default=None, help="reverse-diffusion steps per frame (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed; each protein's sampler seed is derived from it and its name")
    p.add_argument("--backmap", default="vacuum", choices=BACKMAP_MODES,
                   help="what the backmapping minimisation runs under (default vacuum, as StarMDIntegrator)")
    p.add_argument("--forcefield", nargs="+", default=list(DEFAULT_FF),
                   help="OpenMM force-field files of the System (energies, backmapping); default amber14 + GBn2")
    p.add_argument("--md-root", default=str(TRAINING / "md"),
                   help="folder of reference MD runs <md-root>/<protein>/r<k>/{traj.dcd,topology.pdb} that the "
                        "all-atom thresholds are fitted on (default training/md)")
    p.add_argument("--reference-replica", type=int, default=0, help="replica k of the reference MD (default 0)")
    p.add_argument("--plan", default=str(TRAINING / "plan.json"), help="plan.json naming structures and their options")
    p.add_argument("--manifest", default=str(TRAINING / "data" / "manifest.json"),
                   help="data manifest whose test split adds to the default proteins")
    p.add_argument("--device", default="auto", help="torch device for the model: auto (CUDA if present), cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads and OpenMM CPU threads (default 1)")
    p.add_argument("--platform", default="auto",
                   help="OpenMM platform of the backmapper: auto (CUDA if present, else CPU), CPU, CUDA, OpenCL, Reference")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder: long_horizon.{json,md,png} and one folder per protein with state.npz, "
                        "prepared.pdb, traj_ca.dcd, traj_aa.dcd (default benchmarks/out/long_horizon/)")
    p.add_argument("--ca-geometry", action=argparse.BooleanOptionalAction, default=True,
                   help="hold each frame's Cα chain links and contacts where MD keeps them, as StarMDIntegrator does "
                        "by default (openmm_starmd.geometry.ca_constraints); the network's own frames are scored too")
    p.add_argument("--fresh", action="store_true", help="ignore saved states in --out and start every protein over")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.total_frames = _integer_ratio(args.time_ns, args.dt_ns, "--time-ns / --dt-ns")
    args.block_frames = _integer_ratio(args.block_ns, args.dt_ns, "--block-ns / --dt-ns")
    args.every_frames = _integer_ratio(args.backmap_every_ns, args.dt_ns, "--backmap-every-ns / --dt-ns")
    _integer_ratio(args.block_ns, args.backmap_every_ns, "--block-ns / --backmap-every-ns")
    torch.set_num_threads(args.threads)
    args.torch_device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with open(args.plan) as fh:
        args.plan_data = json.load(fh)
    proteins = args.protein or default_proteins(args.plan_data, Path(args.manifest))
    platform, props = pick_platform(args.platform, args.threads)

    model_path = Path(args.model) if args.model else bundled_model_path()
    loaded = load_model(model_path, device=args.torch_device)
    model_sha = sha256_file(model_path)
    config = loaded.sampling_config.to_dict()
    if args.steps is not None:
        config["steps"] = args.steps
    args.fingerprint = {"model_sha256": model_sha, "dt_ns": args.dt_ns, "backmap_every_ns": args.backmap_every_ns,
                        "seed": args.seed, "sampling": config, "forcefield": list(args.forcefield),
                        "backmap": args.backmap, "ca_geometry": args.ca_geometry}
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "long-horizon stability (issue: evaluation, benchmark 2)",
        "command": "python benchmarks/long_horizon.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": {"name": str(args.model) if args.model else "bundled default", "path": str(model_path),
                  "sha256": model_sha, "steps": loaded.metadata.get("steps"),
                  "train_proteins": loaded.metadata.get("train_proteins")},
        "settings": {"time_ns": args.time_ns, "dt_ns": args.dt_ns, "block_ns": args.block_ns,
                     "backmap_every_ns": args.backmap_every_ns, "tolerance": args.tolerance, "seed": args.seed,
                     "sampling": config, "forcefield": list(args.forcefield), "backmap": args.backmap,
                     "ca_geometry": args.ca_geometry, "torch_device": args.torch_device, "threads": args.threads, "openmm_platform": platform.getName()},
        "definitions": {
            "ca_validity": "every generated frame: no non-neighbour Cα pair < ca_clash_nm and no consecutive Cα pair "
                           "> ca_break_nm (gaps of the start exempt), as kept (after the Cα projection when "
                           "ca_geometry is on)",
            "raw_ca_validity": "the same on the network's own frames, before the Cα projection and disulfide bounds",
            "combined_validity": "all-atom (backmapped) frames: Cα-valid AND all-atom valid (peptide bonds, "
                                 "clashscore, Ramachandran and rotamer outlier fractions vs the thresholds)",
            "criterion": "pass if no complete block after the first has validity below the first block's - tolerance",
        },
    }
    results = earlier_results(args.out / "long_horizon.json", model_sha, proteins) if not args.fresh else {}
    print(f"model: {meta['model']['name']} ({model_path}); proteins: {', '.join(proteins)}; "
          f"{args.time_ns:g} ns at Δt {args.dt_ns:g} ns; blocks of {args.block_ns:g} ns; all-atom frame every "
          f"{args.backmap_every_ns:g} ns; torch {args.torch_device}, OpenMM {platform.getName()}", flush=True)
    for name in proteins:
        run_protein(name, loaded, args, platform, props, results, meta)
        print("\n" + markdown(name, results[name]) + "\n", flush=True)
    print(f"wrote {args.out / 'long_horizon.json'}, {args.out / 'long_horizon.md'}, {args.out / 'long_horizon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
