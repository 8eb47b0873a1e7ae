"""The token sequence and the shared coordinate convention of diffusion (model/sequence.py)."""
import pytest
import torch

from openmm_starmd.diffusion import SE3Diffuser
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model.sequence import (
    ResidueFeatures,
    apply_contextual_noise,
    ca_centroid,
    noisy_frame_origins,
    shift_frames,
    training_sequence,
)

from .helpers import residues_of

L = 3


def _window(md, batch=2):
    f = md["frames"]
    idx = torch.stack([torch.arange(L), torch.arange(5, 5 + L)])[:batch]
    return Rigid(f.rots[idx], f.trans[idx])


def test_noisy_frames_are_diffused_about_the_previous_clean_centroid(short_md):
    clean = _window(short_md)
    mask = torch.ones(2, clean.trans.shape[2], dtype=torch.bool)
    mask[:, :5] = False
    clean.trans[:, :, :5] = 1e3  # missing residues must not move the centroid
    origins = noisy_frame_origins(clean, mask)
    cent = clean.trans[:, :, 5:].mean(2)
    assert torch.allclose(origins[:, 0], cent[:, 0])
    assert torch.allclose(origins[:, 1:], cent[:, :-1])


def test_training_sequence_layout_and_forward_process(short_md):
    diffuser = SE3Diffuser()
    clean = _window(short_md)
    mask = residues_of(short_md, batch=2).mask
    t = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.3, 1.0]], dtype=torch.float64)
    seq, targets = training_sequence(diffuser, clean, mask, t, torch.tensor([0.1, 1.0], dtype=torch.float64),
                                     generator=torch.Generator().manual_seed(0))
    assert seq.frames.trans.shape[:2] == (2, 2 * L)
    assert seq.frame_index.tolist() == [0, 1, 2, 0, 1, 2]
    assert seq.noisy.tolist() == [False] * L + [True] * L
    assert torch.equal(seq.noise_level[:, L:], t) and torch.equal(seq.noise_level[:, :L], torch.zeros_like(t))
    assert torch.equal(seq.frames.trans[:, :L], clean.trans)  # tau=None: history is the clean frames
    # the noisy half is the diffuser's forward process in shifted coordinates, shifted back
    expected, rot_score, _ = diffuser.forward_marginal(shift_frames(clean, targets.origins), t[..., None],
                                                       generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seq.frames.trans[:, L:], shift_frames(expected, -targets.origins).trans)
    assert torch.allclose(targets.noisy_shifted.rots, expected.rots) and torch.allclose(targets.rot_score, rot_score)


def test_training_sequence_moves_with_the_protein(short_md):
    """Shifting the trajectory by c shifts every token by c: no dependence on the absolute position."""
    diffuser = SE3Diffuser()
    clean = _window(short_md)
    mask = residues_of(short_md, batch=2).mask
    t = torch.full((2, L), 0.6, dtype=torch.float64)
    tau = torch.full((2, L), 0.05, dtype=torch.float64)
    c = torch.tensor([40.0, -25.0, 7.0], dtype=torch.float64)

    def run(frames):
        return training_sequence(diffuser, frames, mask, t, torch.ones(2, dtype=torch.float64), tau=tau,
                                 generator=torch.Generator().manual_seed(1))[0]

    a, b = run(clean), run(Rigid(clean.rots, clean.trans + c))
    assert torch.allclose(b.frames.trans - c, a.frames.trans, atol=1e-10)
    assert torch.allclose(b.frames.rots, a.frames.rots, atol=1e-12)


def test_contextual_noise_is_centred_on_the_frame(short_md):
    diffuser = SE3Diffuser()
    frame = Rigid(short_md["frames"].rots[:1], short_md["frames"].trans[:1] + 30.0)  # far from the origin
    mask = torch.ones(1, frame.trans.shape[1], dtype=torch.bool)
    noised = apply_contextual_noise(diffuser, frame, torch.tensor([0.1], dtype=torch.float64), mask,
                                    generator=torch.Generator().manual_seed(2))
    shift = ca_centroid(noised, mask) - ca_centroid(frame, mask)
    assert shift.norm() < 0.3  # VP shrinkage about the origin would have moved it by ~1.5 nm
    assert (noised.trans - frame.trans).norm(dim=-1).mean() > 0.1  # but it is perturbed


def test_residue_features_validation():
    ok = dict(aatype=[0, 5, 20], residue_index=[1, 2, 3], chain_index=[0, 0, 1])
    feats = ResidueFeatures.build(**ok, batch=2)
    assert feats.shape == (2, 3) and feats.mask.all()
    with pytest.raises(ValueError, match="aatype values"):
        ResidueFeatures.build(**dict(ok, aatype=[0, 21, 3]))
    with pytest.raises(ValueError, match="share one shape"):
        ResidueFeatures.build(**dict(ok, residue_index=[1, 2]))
    with pytest.raises(ValueError, match="no valid residue"):
        ResidueFeatures.build(**ok, mask=[False, False, False])
    with pytest.raises(TypeError, match="integer"):
        ResidueFeatures.build(**dict(ok, residue_index=[1.0, 2.0, 3.0]))
    source = torch.tensor([0, 0, 1])
    feats = ResidueFeatures.build(ok["aatype"], ok["residue_index"], source)
    feats.chain_index[0, 0] = 7
    assert source[0] == 0  # the features own their data
