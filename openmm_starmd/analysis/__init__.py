"""ATLAS-style evaluation of generated protein trajectories, as in STAR-MD's benchmark.

Stateless functions over mdtraj Trajectories (or Cα coordinate arrays in nm), grouped by idea:

- :mod:`.validity` — Cα clashes and chain breaks, energy validity, validity along time.
- :mod:`.stereochemistry` — all-atom checks: peptide bonds, heavy-atom clashscore,
  Ramachandran and rotamer outliers against a pooled dihedral library built from real structures
  (``data/dihedral_reference.npz``, training/build_dihedral_reference.py), per-frame thresholds
  at the reference MD's 99th percentile.
- :mod:`.coverage` — PCA JSD and recall, RMSF and its correlation, pairwise RMSD, PCA W2,
  weak/transient contact Jaccard.
- :mod:`.dynamics` — TICA at a lag in ns, TIC0 statistics, RMSD vs lag, PC-space
  autocorrelation, VAMP-2, decorrelation times.
- :mod:`.baselines` — ANM and Gaussian-noise generators (the MD oracle is a second replica).
- :mod:`.report` — :func:`evaluate` (JSON + PNG report) and :func:`evaluate_many` (table).

Everything is superposed on the Cα atoms of the first reference frame before it is measured.
"""

from .alignment import aligned_ca, ca_indices, ca_xyz, kabsch_superpose, superposed_rmsd
from .baselines import anm_ensemble, anm_hessian, anm_modes, gaussian_ensemble
from .coverage import (PCA, ContactJaccard, contact_jaccard, contact_probabilities, fit_pca,
                       histogram_jsd, mean_pairwise_rmsd, pca_jsd, pca_project, pca_recall,
                       pca_w2, rmsf, rmsf_correlation)
from .dynamics import (DynamicsComparison, TICAModel, autocorrelation, compare_dynamics,
                       decorrelation_time, fit_tica, lag_grid_ns, rmsd_vs_lag, tica_project,
                       valid_segments, vamp2_score)
from .inputs import InputError, check_same_protein, load_trajectory, protein_sequence
from .report import PLOT_FILES, evaluate, evaluate_many, summary_table
from .stereochemistry import (AllAtomCriteria, AllAtomValidity, DihedralReference,
                              allatom_validity, backbone_dihedrals, bundled_dihedral_reference,
                              fit_allatom_criteria,
                              fit_dihedral_reference, heavy_atom_clashscore, is_all_atom,
                              peptide_bond_lengths, sidechain_dihedrals)
from .validity import (CaValidity, ca_breaks, ca_clashes, ca_validity, energy_validity,
                       validity_over_time)

__all__ = [
    "aligned_ca", "ca_indices", "ca_xyz", "kabsch_superpose", "superposed_rmsd",
    "anm_ensemble", "anm_hessian", "anm_modes", "gaussian_ensemble",
    "PCA", "ContactJaccard", "contact_jaccard", "contact_probabilities", "fit_pca",
    "histogram_jsd", "mean_pairwise_rmsd", "pca_jsd", "pca_project", "pca_recall", "pca_w2",
    "rmsf", "rmsf_correlation",
    "DynamicsComparison", "TICAModel", "autocorrelation", "compare_dynamics",
    "decorrelation_time", "fit_tica", "lag_grid_ns", "rmsd_vs_lag", "tica_project",
    "valid_segments", "vamp2_score",
    "InputError", "check_same_protein", "load_trajectory", "protein_sequence",
    "PLOT_FILES", "evaluate", "evaluate_many", "summary_table",
    "AllAtomCriteria", "AllAtomValidity", "DihedralReference", "allatom_validity",
    "backbone_dihedrals", "bundled_dihedral_reference", "fit_allatom_criteria", "fit_dihedral_reference",
    "heavy_atom_clashscore", "is_all_atom", "peptide_bond_lengths", "sidechain_dihedrals",
    "CaValidity", "ca_breaks", "ca_clashes", "ca_validity", "energy_validity",
    "validity_over_time",
]
