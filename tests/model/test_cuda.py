"""The model on CUDA: the same numbers as on the CPU, and the KV cache exact there too.

Skipped where no GPU is visible (CI has none); run on a GPU machine with
``python -m pytest -q tests/model/test_cuda.py tests/test_integrator.py -k cuda``.
"""
import dataclasses

import pytest
import torch

from openmm_starmd.checkpoints import load_model
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model import ModelConfig

from .helpers import LAYOUTS, random_network, residues_of, training_layout
from .test_kv_cache import _rollout_vs_full

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to(obj, device):
    """Move tensors inside Rigid / dataclasses (ResidueFeatures, TokenSequence) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Rigid):
        return Rigid(obj.rots.to(device), obj.trans.to(device))
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


@pytest.mark.parametrize("layout", ["joint", "posterior_dt_prior"])
@pytest.mark.parametrize("mode, window", [("full", None), ("window", 2)])
def test_cached_rollout_equals_block_causal_forward_on_cuda(short_md, layout, mode, window):
    """float64 on the GPU: cached steps equal the full forward as on the CPU (1e-8)."""
    L = 6
    net = random_network(ModelConfig(**LAYOUTS[layout])).cuda()
    seq = _to(training_layout(short_md["frames"], L, batch=2, context_noise_nm=0.05), "cuda")
    mask = torch.ones(seq.frames.trans.shape[2], dtype=torch.bool)
    mask[[0, 17]] = False
    res = _to(residues_of(short_md, batch=2, mask=mask), "cuda")
    assert _rollout_vs_full(net, res, seq, L, mode, window) < 1e-8


def test_bundled_model_gives_the_same_denoising_on_cuda_and_cpu(short_md):
    """The shipped float32 weights: one block-causal forward on real frames agrees to 1e-4 nm."""
    L = 4
    frames = Rigid(short_md["frames"].rots.float(), short_md["frames"].trans.float())
    seq = training_layout(frames, L, batch=1)
    res = residues_of(short_md)
    outs = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(device=device)
        net = loaded.model.eval()
        with torch.no_grad():
            out = net(_to(res, device), _to(seq, device))
        outs[device] = (out.trans.cpu(), out.rots.cpu())
        assert next(net.parameters()).device.type == device
    assert torch.isfinite(outs["cuda"][0]).all()
    assert (outs["cuda"][0] - outs["cpu"][0]).abs().max() < 1e-4
    assert (outs["cuda"][1] - outs["cpu"][1]).abs().max() < 1e-4
