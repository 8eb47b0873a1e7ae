"""K independent STAR-MD trajectories of one protein, batched through the model in one pass.

An OpenMM Context holds one set of positions, so :class:`~openmm_starmd.integrator.StarMDIntegrator`
runs one trajectory. For ensembles (``starmd run --replicas K``) this module drives the sampler
directly with ``n_replicas=K``: every reverse step is one network pass over K x N noisy tokens, and
each replica is backmapped on its own at report frames with one shared
:class:`~openmm_starmd.backmap.Backmapper` (its private Context is reused; only positions change).
Replica k's trajectory is exactly as independent as a separate run: the sampler draws separate noise
per replica (tested in tests/test_sampling.py).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from openmm import unit

from .backmap import Backmapper, atom_layout
from .geometry.frames import frames_from_backbone
from .geometry.rigid import Rigid
from .protein import disulfide_bounds, extract_protein

__all__ = ["ReplicaGenerator"]


class ReplicaGenerator:
    """Generate K trajectories from one all-atom structure.

    Parameters
    ----------
    topology : openmm.app.Topology
    positions : openmm.unit.Quantity, (n_atoms, 3) length
        Starting structure, shared by all replicas (frame 0).
    system : openmm.System
        Used only for backmapping (a private copy; never modified).
    model : LoadedModel
        From :func:`openmm_starmd.checkpoints.load_model`.
    dt_ns : float
        Time between frames, ns.
    n_replicas : int
    seed : int
    device : str
        torch device.
    sampling : SamplingConfig, optional (default: the model's own)
    backmap : str
        "vacuum", "system" or "none" (see backmap.py).
    ca_geometry : bool
        Hold the generated Cα traces where MD keeps them (as ``StarMDIntegrator(keep_ca_geometry=True)``).
    """

    def __init__(self, topology, positions, system, model, dt_ns: float, n_replicas: int, seed: int,
                 device: str = "cpu", sampling=None, backmap: str = "vacuum", ca_geometry: bool = True):
        from .sampling import AutoregressiveSampler

        if n_replicas < 1:
            raise ValueError(f"n_replicas={n_replicas} must be at least 1.")
        positions_nm = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
        protein = extract_protein(topology, positions_nm * unit.nanometer)
        atom_residue, backbone_atoms = atom_layout(topology, protein.topology_residue_index)
        self.backmapper = Backmapper(system, atom_residue, backbone_atoms, mode=backmap)
        self._backbone_atoms = backbone_atoms
        self.sampler = AutoregressiveSampler(
            model.model, model.diffuser, torch.as_tensor(protein.aatype), torch.as_tensor(protein.residue_index),
            torch.as_tensor(protein.chain_index), torch.as_tensor(protein.mask), dt_ns=dt_ns,
            config=sampling if sampling is not None else model.sampling_config, n_replicas=n_replicas,
            seed=seed, device=device, pair_bounds=disulfide_bounds(topology, protein.topology_residue_index),
            ca_geometry=ca_geometry)
        start = self._frames_of(positions_nm)
        self.sampler.add_history(Rigid(start.rots.to(self.sampler.dtype), start.trans.to(self.sampler.dtype)))
        self.n_replicas = n_replicas
        self.positions_nm = [positions_nm.copy() for _ in range(n_replicas)]  # last backmapped, per replica

    def _frames_of(self, positions_nm: np.ndarray) -> Rigid:
        x = torch.as_tensor(positions_nm, dtype=torch.float64)
        bb = self._backbone_atoms
        return frames_from_backbone(x[bb[:, 0]], x[bb[:, 1]], x[bb[:, 2]])

    def run(self, n_frames: int, every: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """Yield after every ``every`` frames: (Cα of those frames (K, every, N, 3) nm,
        all-atom positions of the last one for each replica [K x (n_atoms, 3) nm])."""
        done = 0
        while done < n_frames:
            k = min(every, n_frames - done)
            with torch.no_grad():
                frames = self.sampler.generate(k)  # (K, k, N)
            ca = frames.trans.detach().double().cpu().numpy()
            for r in range(self.n_replicas):
                new = Rigid(frames.rots[r, -1].double().cpu(), frames.trans[r, -1].double().cpu())
                old = self._frames_of(self.positions_nm[r])
                result = self.backmapper.backmap(self.positions_nm[r], old, new, frame_index=done + k,
                                                 compute_energy=False)
                self.positions_nm[r] = np.asarray(result.positions_nm, dtype=np.float64)
            done += k
            yield ca, [p.copy() for p in self.positions_nm]
