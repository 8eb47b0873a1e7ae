"""StarMDIntegrator: STAR-MD as an OpenMM Integrator.

This is the OpenMM face of STAR-MD's autoregressive sampling: one integrator step is one MD frame
Δt (0.01-10 ns), generated for all residues at once by the SE(3) diffusion model conditioned on
the frames before it (:class:`openmm_starmd.sampling.AutoregressiveSampler`), then mapped back to
all atoms (:mod:`openmm_starmd.backmap`). Users keep the plain ``openmm.app.Simulation``::

    integrator = StarMDIntegrator(dt=1*nanoseconds)
    sim = Simulation(pdb.topology, system, integrator)
    sim.context.setPositions(pdb.positions)
    sim.reporters.append(DCDReporter("traj.dcd", 10))
    sim.step(1000)                      # 1 µs, 100 all-atom frames

How it plugs into OpenMM (choices the paper, which has no OpenMM side, leaves to us):

* The class is a ``CustomIntegrator`` with an empty program whose ``step(n)`` is overridden in
  Python. ``Simulation`` calls ``integrator.step(k)`` from Python (in chunks of at most 10), so the
  override runs; nothing in C++ ever steps it. ``getStepSize()`` is Δt (OpenMM stores it in ps:
  1 ns reads back as 1000 ps), so DCD headers and ``StateDataReporter`` times are right, and
  ``step`` advances the Context's step count and time itself.
* **Finding the Context.** ``Integrator.step`` receives no Context, so on the first call the
  integrator looks up the call stack for the ``Simulation`` whose ``integrator`` it is (that
  frame's ``self``), and binds to its Context and Topology. Users driving a bare Context call
  :meth:`StarMDIntegrator.bind` first.
* **When all-atom positions exist.** Generating a frame is cheap next to backmapping it, so the
  integrator only backmaps when someone will read the positions: at the end of every chunk that
  ends where ``Simulation._simulate`` stops to run reporters or where the user's ``sim.step(n)``
  ends. It learns this from ``_simulate``'s frame (its local ``stepsToGo`` equals the chunk size
  exactly on the last chunk before a report or the end). Between those steps the Context keeps the
  last backmapped positions, while step count and time move on. When the caller is anything else
  (a bare Context, ``runForClockTime``, a ``Simulation`` subclass that replaces ``_simulate``),
  every ``step`` call ends with a backmap, which is always correct, only slower.
* **Velocities.** Frames Δt ≥ 10 ps apart have decorrelated velocities, so after each backmap the
  velocities are drawn from Maxwell-Boltzmann at ``temperature`` (``setVelocitiesToTemperature``
  with a seed from the integrator's own generator); ``temperature=None`` sets them to zero.
* **User edits.** If the Context's positions differ from the last ones the integrator wrote (the
  user called ``setPositions``, ``minimizeEnergy``, ``loadState``), they start a new trajectory:
  the model's memory of earlier frames is dropped and the new structure is its first frame.
* **Resuming.** :meth:`save_state` writes the generator's own state (the sampler's history and
  random state, the velocity generator, the last written positions) to an ``.npz`` file without
  pickles; together with OpenMM's ``saveState``/``saveCheckpoint`` a run resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from typing import Optional

import numpy as np
import openmm
import torch
from openmm import app, unit

from .backmap import BACKMAP_MODES, Backmapper, atom_layout
from .geometry.frames import frames_from_backbone
from .geometry.rigid import Rigid
from .protein import disulfide_bounds, extract_protein

__all__ = ["StarMDIntegrator", "StarMDError", "DT_RANGE_NS"]

#: Δt range the STAR-MD model is trained on (LogUniform[0.01, 10] ns).
DT_RANGE_NS = (0.01, 10.0)
_STATE_FORMAT = "openmm-starmd-integrator-state/1"
# Positions equal to the last ones written, to this tolerance, mean "nobody touched the Context".
_SAME_POSITIONS_NM = 1e-6


class StarMDError(RuntimeError):
    """The generative model or the integrator's setup failed; the message says what to change."""


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(
            f"device={device!r} was requested but CUDA is not available to torch; running the model on the CPU.",
            stacklevel=3,
        )
        return "cpu"
    return str(device)


def _to_ns(value, name: str) -> float:
    if unit.is_quantity(value):
        return value.value_in_unit(unit.nanosecond)
    raise TypeError(f"{name}={value!r} has no unit; pass an openmm.unit time such as 1*unit.nanoseconds.")


def _flatten(tree, prefix: str, arrays: dict, meta: dict) -> None:
    """Split nested plain data into numpy arrays (for npz) and JSON scalars."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if "/" in str(key):
                raise ValueError(f"state key {key!r} contains '/'; state keys must be plain names.")
            _flatten(value, f"{prefix}/{key}" if prefix else str(key), arrays, meta)
        if not tree:
            meta[prefix] = {"__empty_dict__": True}
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple, np.ndarray, torch.Tensor)) for v in tree):
        meta[prefix] = {"__list__": len(tree), "__tuple__": isinstance(tree, tuple)}
        for i, value in enumerate(tree):
            _flatten(value, f"{prefix}/{i}", arrays, meta)
    elif isinstance(tree, torch.Tensor):
        arrays[prefix] = tree.detach().cpu().numpy()
        meta[prefix] = {"__tensor__": str(tree.dtype).replace("torch.", "")}
    elif isinstance(tree, np.ndarray):
        arrays[prefix] = tree
        meta[prefix] = {"__array__": True}
    elif isinstance(tree, np.generic):
        meta[prefix] = {"__value__": tree.item()}
    else:
        meta[prefix] = {"__value__": tree}


def _unflatten(arrays, meta: dict):
    """Inverse of :func:`_flatten`."""
    root: dict = {}

    def put(path, value):
        node = root
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    for path, info in meta.items():
        if "__tensor__" in info:
            put(path, torch.from_numpy(np.array(arrays[path])).to(getattr(torch, info["__tensor__"])))
        elif "__array__" in info:
            put(path, np.array(arrays[path]))
        elif "__value__" in info:
            put(path, info["__value__"])
        elif "__empty_dict__" in info:
            put(path, {})

    def lists(node, path=""):
        if not isinstance(node, dict):
            return node
        node = {k: lists(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        info = meta.get(path, {})
        if "__list__" in info:
            items = [node[str(i)] for i in range(info["__list__"])]
            return tuple(items) if info["__tuple__"] else items
        return node

    return lists(root)


class StarMDIntegrator(openmm.CustomIntegrator):
    """Generates protein dynamics with STAR-MD, one frame Δt per step, inside OpenMM.

    Parameters
    ----------
    dt : openmm.unit.Quantity (time)
        Time between generated frames, 0.01-10 ns (the range the model was trained on).
    model : str, path, LoadedModel, (network, diffuser) or None
        ``None`` uses the bundled default model; a bundled model name or a checkpoint path is
        loaded with :func:`openmm_starmd.checkpoints.load_model`; a ``LoadedModel`` (what
        ``load_model`` returns) or a ``(StarMDNetwork, SE3Diffuser)`` pair is used as is.
    device : str
        ``"auto"`` (CUDA if torch sees it, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        CUDA requested but unavailable falls back to the CPU with a warning.
    diffusion_steps : int, optional
        Reverse-diffusion steps per frame; default from the sampling configuration.
    seed : int, optional
        Seed of the generator (frames) and of the velocity draws; ``None``: fresh randomness.
    window : int, optional
        Number of past frames the model attends to; default from the sampling configuration.
    backmap : {"vacuum", "system", "none"}
        How generated frames become all-atom positions (see :mod:`openmm_starmd.backmap`).
    temperature : openmm.unit.Quantity (temperature) or None
        Temperature of the Maxwell-Boltzmann velocities set after each backmap; ``None`` sets
        velocities to zero.
    sampling : SamplingConfig, optional
        Full sampling configuration; default: the one saved with the model, else the defaults.
        ``diffusion_steps`` and ``window`` override its fields.
    backmap_options : dict, optional
        Extra keyword arguments for :class:`openmm_starmd.backmap.Backmapper` (``restrain``, ``hold``,
        ``restraint_k``, ``max_iterations``, ``tolerance``, ``dielectric``, ``deterministic``).
    keep_disulfides : bool
        Keep the Cα–Cα distance of every disulfide of the Topology (SG–SG bonds) within
        :data:`openmm_starmd.protein.DISULFIDE_CA_RANGE_NM` in each generated frame (the model
        knows nothing of disulfides and otherwise pulls them apart over long rollouts; see
        :mod:`openmm_starmd.geometry.pair_bounds`). Default True.
    keep_ca_geometry : bool
        Hold each generated frame's Cα trace where MD keeps it, like SHAKE on virtual bonds:
        consecutive Cα 3.6–4.1 Å, other Cα pairs at least 3.5 Å apart (gaps and cis peptides of the
        starting structure respected), by moving residues rigidly before the frame becomes history
        and is backmapped (:mod:`openmm_starmd.geometry.ca_constraints`). The network alone
        scatters consecutive Cα over 3.3–4.4 Å and its chain breaks and clashes accumulate over a
        rollout; False gives the network's frames unchanged (what the paper evaluates).
        Default True.

    Notes
    -----
    * All-atom positions are produced only where they are read: at steps where a reporter of the
      ``Simulation`` reports and at the end of each ``sim.step(n)``. In between, the Context
      keeps the last backmapped positions while its step count and time advance.
    * Velocities after each backmap are Maxwell-Boltzmann at ``temperature`` (or zero).
    * Changing the Context's positions (``setPositions``, ``minimizeEnergy``, or ``loadState``
      without the matching :meth:`load_state`) starts a new trajectory from them; the model
      forgets the earlier frames.
    * Only the protein moves; explicit water is refused, and other non-protein atoms that are
      not bonded to the protein (ions, free ligands) stay where they are, with a warning.
    """

    def __init__(
        self,
        dt=1.0 * unit.nanoseconds,
        model=None,
        device: str = "auto",
        diffusion_steps: Optional[int] = None,
        seed: Optional[int] = None,
        window: Optional[int] = None,
        backmap: str = "vacuum",
        temperature=300.0 * unit.kelvin,
        sampling=None,
        backmap_options: Optional[dict] = None,
        keep_disulfides: bool = True,
        keep_ca_geometry: bool = True,
    ):
        dt_ns = _to_ns(dt, "dt")
        lo, hi = DT_RANGE_NS
        if not lo <= dt_ns <= hi:
            raise ValueError(
                f"dt={dt_ns:g} ns is outside the {lo:g}-{hi:g} ns range STAR-MD is trained on; choose a dt in that range."
            )
        if backmap not in BACKMAP_MODES:
            raise ValueError(f"backmap={backmap!r} is not known; use one of {BACKMAP_MODES}.")
        if temperature is not None and not unit.is_quantity(temperature):
            raise TypeError(f"temperature={temperature!r} has no unit; pass e.g. 300*unit.kelvin, or None for zero velocities.")
        super().__init__(dt_ns * 1000.0)  # CustomIntegrator takes ps
        # No computations: OpenMM never integrates anything; step() below does the work.
        self._dt_ns = dt_ns
        self._device = _resolve_device(device)
        self._model_spec = model
        self._generator = None  # (network, diffuser)
        self._model_sampling = None  # the checkpoint's own SamplingConfig, if it has one
        self._load_generator()  # now, so a bad checkpoint fails here and not at the first step
        self._sampling = self._sampling_config(
            sampling if sampling is not None else self._model_sampling, diffusion_steps, window
        )
        self._seed = int(seed) if seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
        self._velocity_rng = np.random.default_rng(self._seed)
        self._backmap_mode = backmap
        self._backmap_options = dict(backmap_options or {})
        self._keep_disulfides = bool(keep_disulfides)
        self._pair_bounds = None  # (pairs, d_min_nm, d_max_nm) of the disulfides, set when bound
        self._keep_ca_geometry = bool(keep_ca_geometry)
        self._temperature = temperature
        self._context = None
        self._topology = None
        self._protein = None
        self._backbone_atoms = None
        self._backmapper = None
        self._sampler = None
        self._last_written = None  # (n_atoms, 3) nm: the positions the Context should hold
        self._generated = None  # (N,) Rigid: latest generated frame
        self._frames_generated = 0
        self._frames_backmapped = 0
        self._trajectories = 0  # trajectories started (first step, or after the user moved atoms)
        self._resume = None  # (path, header, tree) from load_state, applied once bound

    # -- configuration -------------------------------------------------------------------
    @staticmethod
    def _sampling_config(sampling, diffusion_steps, window):
        from .sampling import SamplingConfig

        config = SamplingConfig() if sampling is None else SamplingConfig.from_dict(sampling.to_dict())
        changes = {}
        if diffusion_steps is not None:
            changes["steps"] = int(diffusion_steps)
        if window is not None:
            changes["window"] = int(window)
        # replace() re-runs SamplingConfig's validation, which names any bad value.
        return dataclasses.replace(config, **changes)

    @property
    def dt(self):
        """Time between generated frames (openmm.unit time)."""
        return self._dt_ns * unit.nanoseconds

    @property
    def device(self) -> str:
        """Torch device the model runs on."""
        return self._device

    @property
    def sampling_config(self):
        """The SamplingConfig frames are drawn with (a copy; set it through the constructor)."""
        return dataclasses.replace(self._sampling)

    @property
    def generated_frames(self) -> Optional[Rigid]:
        """Residue frames of the most recently generated MD frame, (N,) Rigid in nm (None before the first step)."""
        return self._generated

    def recent_ca_nm(self, k: int) -> np.ndarray:
        """Cα positions (frame origins) of the last ``k`` frames generated by the latest ``step`` call.

        Returns (k, N, 3) nm, oldest first: a Cα trace of every frame at no backmapping cost
        (``starmd run`` writes it as traj_ca.dcd). ``k`` may not exceed that call's step count.
        """
        recent = getattr(self, "_recent_ca_nm", None)
        if recent is None or k > len(recent):
            have = 0 if recent is None else len(recent)
            raise ValueError(f"recent_ca_nm({k}) asks for more frames than the last step() made ({have}).")
        return recent[len(recent) - k:]

    @property
    def frames_generated(self) -> int:
        """MD frames generated by this integrator so far (all trajectories)."""
        return self._frames_generated

    @property
    def frames_backmapped(self) -> int:
        """Generated frames turned into all-atom positions so far."""
        return self._frames_backmapped

    @property
    def strained_frames(self) -> int:
        """Backmapped frames that kept two atoms closer than 0.3 Å or a disulfide stretched beyond
        2.3 Å: the generated residue frames were too unphysical to repair (a ``BackmapWarning`` was
        issued for the first of each kind)."""
        return 0 if self._backmapper is None else self._backmapper.strained_frames

    @property
    def ca_repaired_frames(self) -> int:
        """Backmapped frames whose restrained minimisation broke the generated Cα trace and that
        were minimised again with Cα held fixed (``Backmapper(repair_ca=True)``, the default)."""
        return 0 if self._backmapper is None else self._backmapper.ca_repaired_frames

    @property
    def ca_projection(self) -> dict:
        """What the Cα projection (``keep_ca_geometry``) did to the current trajectory's generated
        frames: ``frames`` generated, ``moved`` (frames it changed), ``unconverged`` (frames left
        with a bound still violated after its last sweep), ``max_violation_nm`` (the largest bound
        violation it found) and ``max_move_nm`` (the largest residue move it made). All zero with
        ``keep_ca_geometry=False`` or before the first step."""
        empty = {"frames": 0, "moved": 0, "unconverged": 0, "max_violation_nm": 0.0, "max_move_nm": 0.0}
        return dict(empty if self._sampler is None else self._sampler.ca_projection)

    @property
    def history_length(self) -> int:
        """Frames in the model's memory of the current trajectory, the starting structure included."""
        return 0 if self._sampler is None else int(self._sampler.n_frames)

    def setStepSize(self, size):  # noqa: N802 (OpenMM name)
        raise ValueError(
            "StarMDIntegrator's step size is the model's frame time dt, fixed at construction; "
            "create a new StarMDIntegrator(dt=...) to change it."
        )

    # -- binding -------------------------------------------------------------------------
    def bind(self, context: openmm.Context, topology: app.Topology) -> None:
        """Attach to a Context and its Topology (done automatically under ``openmm.app.Simulation``).

        Parameters
        ----------
        context : openmm.Context
            A Context created with this integrator.
        topology : openmm.app.Topology
            Topology of the Context's System (same particles, same order).
        """
        n_particles = context.getSystem().getNumParticles()
        if n_particles != topology.getNumAtoms():
            raise ValueError(
                f"the System has {n_particles} particles but the Topology has {topology.getNumAtoms()} atoms; "
                "pass the Topology the System was built from."
            )
        if self._context is not None and self._context is not context:
            raise ValueError("this StarMDIntegrator is already bound to another Context; create one integrator per Context.")
        self._context = context
        self._topology = topology

    def _bind_from_stack(self, frame) -> None:
        """Find the Simulation that owns this integrator among the callers and bind to it."""
        depth = 0
        while frame is not None and depth < 8:
            owner = frame.f_locals.get("self")
            if isinstance(owner, app.Simulation) and owner.integrator is self:
                self.bind(owner.context, owner.topology)
                return
            frame = frame.f_back
            depth += 1
        raise StarMDError(
            "StarMDIntegrator.step() found no Context: run it through openmm.app.Simulation, "
            "or call integrator.bind(context, topology) first."
        )

    @staticmethod
    def _is_last_chunk(frame, steps: int) -> bool:
        """Will positions be read after this call? Exact for ``Simulation._simulate``, True otherwise."""
        if frame is None or frame.f_code is not app.Simulation._simulate.__code__:
            return True
        local = frame.f_locals
        if local.get("endTime") is not None:
            return True  # runForClockTime may stop after any chunk
        return local.get("stepsToGo") == steps

    # -- setup ---------------------------------------------------------------------------
    def _load_generator(self):
        if self._generator is None:
            spec = self._model_spec
            if spec is None or isinstance(spec, (str, os.PathLike)):
                from .checkpoints import load_model

                loaded = load_model(spec, device=self._device)
            else:
                loaded = spec
            self._generator = _network_and_diffuser(loaded)
            self._model_sampling = getattr(loaded, "sampling_config", None)
            trained = (getattr(loaded, "metadata", None) or {}).get("trained_dt_ns")
            if trained and not trained[0] / 1.5 <= self._dt_ns <= trained[1] * 1.5:
                warnings.warn(
                    f"dt={self._dt_ns:g} ns is outside the Δt range this model's training data covered "
                    f"({trained[0]:g}-{trained[1]:g} ns, see its model card): the frames are an extrapolation. "
                    "Choose a dt in that range, or a model trained on longer trajectories.",
                    stacklevel=3,
                )
        return self._generator

    def _setup(self, positions_nm: np.ndarray) -> None:
        """Read the protein from the bound Topology and build the backmapper (once)."""
        if self._protein is not None:
            return
        protein = extract_protein(self._topology, positions_nm * unit.nanometer)
        water = [s for s in protein.skipped if s.kind == "water"]
        if water:
            raise StarMDError(
                f"the Topology holds {len(water)} water molecules, but StarMDIntegrator moves only the protein; "
                "remove them (Modeller.deleteWater) and use implicit solvent or vacuum."
            )
        atom_residue, backbone_atoms = atom_layout(self._topology, protein.topology_residue_index)
        still = np.flatnonzero(atom_residue < 0)
        if still.size:
            names = sorted({s.name for s in protein.skipped if np.isin(s.atom_indices, still).any()})
            warnings.warn(
                f"{still.size} atoms of non-protein residues ({', '.join(names)}) are not moved by StarMDIntegrator; "
                "they stay where they are.",
                stacklevel=4,
            )
        context = self._context
        platform = context.getPlatform()
        properties = {}
        for name in ("DeviceIndex", "Precision"):
            if name in platform.getPropertyNames():
                properties[name] = platform.getPropertyValue(context, name)
        self._backmapper = Backmapper(
            context.getSystem(),
            atom_residue,
            backbone_atoms,
            mode=self._backmap_mode,
            platform=platform,
            platform_properties=properties,
            **self._backmap_options,
        )
        self._protein = protein
        self._backbone_atoms = backbone_atoms
        if self._keep_disulfides:
            self._pair_bounds = disulfide_bounds(self._topology, protein.topology_residue_index)

    def _frames_of(self, positions_nm: np.ndarray) -> Rigid:
        x = torch.as_tensor(positions_nm, dtype=torch.float64)
        bb = self._backbone_atoms
        return frames_from_backbone(x[bb[:, 0]], x[bb[:, 1]], x[bb[:, 2]])

    def _new_sampler(self):
        """A fresh sampler; trajectory k gets its own seed derived from (seed, k), so restarting
        from the same structure does not replay the same trajectory."""
        from .sampling import AutoregressiveSampler

        network, diffuser = self._load_generator()
        protein = self._protein
        return AutoregressiveSampler(
            network,
            diffuser,
            torch.as_tensor(protein.aatype),
            torch.as_tensor(protein.residue_index),
            torch.as_tensor(protein.chain_index),
            torch.as_tensor(protein.mask),
            dt_ns=self._dt_ns,
            config=self._sampling,
            n_replicas=1,
            seed=int(np.random.SeedSequence([self._seed, self._trajectories]).generate_state(1, np.uint64)[0] >> 1),
            device=self._device,
            pair_bounds=self._pair_bounds,
            ca_geometry=self._keep_ca_geometry,
        )

    def _start_trajectory(self, positions_nm: np.ndarray) -> None:
        """The Context's structure becomes frame 0 of a fresh trajectory."""
        self._trajectories += 1
        self._sampler = self._new_sampler()
        frames = self._frames_of(positions_nm)
        self._sampler.add_history(Rigid(frames.rots.float(), frames.trans.float()))
        # The Context's positions now belong to this trajectory; until the next backmap they are
        # what later calls must find there, or the user has changed them.
        self._last_written = positions_nm
        self._generated = None

    # -- OpenMM interface ----------------------------------------------------------------
    def step(self, steps: int) -> None:
        """Generate ``steps`` frames; backmap when positions will be read (see the module docstring).

        Parameters
        ----------
        steps : int
            Number of frames Δt to advance.
        """
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps={steps!r} must be a non-negative integer number of frames.")
        steps = int(steps)
        if steps == 0:
            return
        caller = sys._getframe(1)
        if self._context is None:
            self._bind_from_stack(caller)
        if self._resume is not None:
            self._apply_resume()
        write = self._is_last_chunk(caller, steps)
        del caller  # frames hold references; don't keep the caller alive

        context = self._context
        state = context.getState(getPositions=True)
        positions_nm = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
        self._setup(positions_nm)
        if self._last_written is None or self._sampler is None or not np.allclose(
            positions_nm, self._last_written, rtol=0.0, atol=_SAME_POSITIONS_NM
        ):
            self._start_trajectory(positions_nm)

        cause = None
        try:
            with torch.no_grad():
                frames = self._sampler.generate(steps)
            finite = bool(torch.isfinite(frames.rots).all() and torch.isfinite(frames.trans).all())
        except FloatingPointError as exc:
            finite, cause = False, exc
        if not finite:
            raise StarMDError(
                f"the model produced non-finite frames between steps {context.getStepCount()} and "
                f"{context.getStepCount() + steps}; the Context was left unchanged. Check the model "
                "checkpoint, or lower dt or the sampler's noise_scale."
            ) from cause
        new = Rigid(frames.rots[0, -1].double().cpu(), frames.trans[0, -1].double().cpu())
        self._recent_ca_nm = frames.trans[0].detach().double().cpu().numpy()  # (steps, N, 3)
        step_count = context.getStepCount() + steps
        if write:
            self._write(positions_nm, new, step_count)
        self._generated = new
        self._frames_generated += steps
        context.setStepCount(step_count)
        context.setTime(state.getTime() + steps * self._dt_ns * unit.nanoseconds)

    def _write(self, positions_nm: np.ndarray, new: Rigid, step_count: int) -> None:
        """Backmap ``new`` from the Context's current structure and put the result into the Context."""
        result = self._backmapper.backmap(
            positions_nm, self._frames_of(positions_nm), new, frame_index=step_count, compute_energy=False
        )
        context = self._context
        context.setPositions(result.positions_nm)
        self._frames_backmapped += 1
        if self._temperature is None:
            context.setVelocities(np.zeros_like(result.positions_nm))
        else:
            seed = int(self._velocity_rng.integers(1, 2**31 - 1))
            context.setVelocitiesToTemperature(self._temperature, seed)
        written = context.getState(getPositions=True).getPositions(asNumpy=True)
        self._last_written = np.asarray(written.value_in_unit(unit.nanometer), dtype=np.float64)

    # -- resuming ------------------------------------------------------------------------
    def save_state(self, path) -> None:
        """Write the generator's state to ``path`` (``.npz``; no pickles).

        Save it at the same step as OpenMM's ``Simulation.saveState``/``saveCheckpoint``; loading
        both resumes the run exactly.
        """
        if self._sampler is None:
            raise StarMDError("save_state() needs a started run; call step() at least once first.")
        meta: dict = {}
        arrays: dict = {}
        tree = {
            "sampler": self._sampler.state_dict(),
            "generated": None if self._generated is None else {"rots": self._generated.rots, "trans": self._generated.trans},
            "last_written": self._last_written,
            "velocity_rng": self._velocity_rng.bit_generator.state,
            "frames_generated": self._frames_generated,
            "frames_backmapped": self._frames_backmapped,
            "trajectories": self._trajectories,
        }
        _flatten(tree, "", arrays, meta)
        header = {
            "format": _STATE_FORMAT,
            "dt_ns": self._dt_ns,
            "n_atoms": int(self._last_written.shape[0]) if self._last_written is not None else None,
            "sampling": self._sampling.to_dict(),
            "seed": self._seed,
            "tree": meta,
        }
        arrays = {f"a{i}:{k}": v for i, (k, v) in enumerate(arrays.items())}
        names = {k.split(":", 1)[1]: k for k in arrays}
        header["arrays"] = names
        tmp = f"{os.fspath(path)}.tmp.npz"
        np.savez(tmp, __header__=np.array(json.dumps(header)), **arrays)
        os.replace(tmp, os.fspath(path))

    def load_state(self, path) -> None:
        """Restore the generator's state written by :meth:`save_state` (same dt, same protein).

        May be called before the first ``step`` (the state is applied once the integrator has found
        its Context). Restore OpenMM's own state (``Simulation.loadState``/``loadCheckpoint``) from
        the same moment, so the Context holds the positions the generator last wrote.
        """
        with np.load(os.fspath(path), allow_pickle=False) as data:
            header = json.loads(str(data["__header__"]))
            if header.get("format") != _STATE_FORMAT:
                raise StarMDError(f"{path} is not a StarMDIntegrator state file; pass a file written by save_state().")
            if abs(header["dt_ns"] - self._dt_ns) > 1e-12 * self._dt_ns:
                raise StarMDError(
                    f"{path} was saved with dt={header['dt_ns']:g} ns but this integrator has dt={self._dt_ns:g} ns; "
                    "create the integrator with the saved dt."
                )
            arrays = {k: data[v] for k, v in header["arrays"].items()}
        tree = _unflatten(arrays, header["tree"])
        self._resume = (str(path), header, tree)
        if self._context is not None:
            self._apply_resume()

    def _apply_resume(self) -> None:
        path, header, tree = self._resume
        self._resume = None
        if header["n_atoms"] is not None and header["n_atoms"] != self._context.getSystem().getNumParticles():
            raise StarMDError(
                f"{path} holds a state for {header['n_atoms']} atoms but the System has "
                f"{self._context.getSystem().getNumParticles()}; load it into the same system it was saved from."
            )
        from .sampling import SamplingConfig

        self._sampling = SamplingConfig.from_dict(header["sampling"])
        self._seed = int(header["seed"])
        positions_nm = np.asarray(tree["last_written"], dtype=np.float64)
        self._trajectories = int(tree["trajectories"])
        self._setup(positions_nm)
        self._sampler = self._new_sampler()
        self._sampler.load_state_dict(tree["sampler"])
        self._generated = None if tree["generated"] is None else Rigid(tree["generated"]["rots"], tree["generated"]["trans"])
        self._last_written = positions_nm
        self._velocity_rng = np.random.default_rng()
        self._velocity_rng.bit_generator.state = tree["velocity_rng"]
        self._frames_generated = int(tree["frames_generated"])
        self._frames_backmapped = int(tree["frames_backmapped"])


def _network_and_diffuser(loaded):
    """(network, diffuser) from a ``LoadedModel`` or a ``(network, diffuser)`` pair."""
    if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
        return loaded[0], loaded[1]
    if hasattr(loaded, "model") and hasattr(loaded, "diffuser"):
        return loaded.model, loaded.diffuser
    raise TypeError(
        f"model={type(loaded).__name__} is not a loaded STAR-MD model; pass None, a checkpoint path, "
        "what openmm_starmd.checkpoints.load_model returns, or a (network, diffuser) pair."
    )
