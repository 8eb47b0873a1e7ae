"""The STAR-MD network configuration: one dataclass, JSON-able, with named sizes.

Which part of STAR-MD: the network hyper-parameters (width, heads, depth, invariant-point counts,
Fourier sizes, the training window L) and the ablation switches of the paper's study (joint vs.
separable space/time attention, a fixed Δt, contextual noise on/off).

Layer layout. The network is ``blocks`` repetitions of ``frame_layers`` per-frame (spatial) layers
followed by ``joint_layers`` joint spatio-temporal layers. The paper's model is 4 blocks of
(one per-frame layer + two joint layers) at width 256; our compact default is 8 joint layers at
width 128 (see :data:`NAMED_CONFIGS` for the measured speed). With ``attention="separable"`` every
joint layer is replaced by a spatial layer (residues of one frame) followed by a temporal layer
(one residue across frames), both under the same causal, window and residue masks.
"""
from __future__ import annotations

from dataclasses import dataclass

from .._config import JsonConfig

__all__ = ["ModelConfig", "NAMED_CONFIGS", "model_config"]

_ATTENTION_MODES = ("joint", "separable")
_ANCHORS = ("previous", "noisy", "posterior")


@dataclass
class ModelConfig(JsonConfig):
    """Hyper-parameters of :class:`openmm_starmd.model.network.StarMDNetwork`.

    Parameters
    ----------
    width : int
        Token feature size C.
    heads : int
        Attention heads H; the scalar head size is ``width // heads`` and must be divisible by 4
        (half of it is rotated by the residue index, half by the frame index, in pairs).
    blocks, frame_layers, joint_layers : int
        Layer layout, see the module docstring.
    query_points, value_points : int
        Invariant query/key points and value points per head (IPA-style).
    mlp_ratio : float
        Hidden size of each transition MLP as a multiple of ``width``.
    time_fourier : int
        Number of frequencies of the Fourier features of the noise level (t for noisy tokens,
        the context-noise level τ for clean tokens), both in [0, 1].
    dt_fourier : int
        Number of frequencies of the Fourier features of log(Δt / 1 ns).
    window : int
        Training window L (frames per training sequence). The sampler's default sliding window
        is :attr:`context_frames` = L - 1, the history the last frame of a training window sees.
    attention : {"joint", "separable"}
        Joint spatio-temporal attention, or the space-then-time ablation.
    fixed_dt_ns : float or None
        If set, the model ignores the Δt it is given and always conditions on this value (ns).
    contextual_noise : bool
        Whether training and sampling perturb the clean history with the context noise τ.
    max_chains : int
        Size of the chain-index embedding table; chain indices are taken modulo this size.
    chain_offset : int
        Added to the residue index once per chain index before the residue RoPE, so residues of
        different chains are far apart in rotary position (larger than any residue-number span).
    rope_base_residue, rope_base_frame : float
        RoPE wavelength bases for the residue and frame axes.
    x0_anchor : {"previous", "noisy", "posterior"}
        The frame each residue's predicted x0 is a rigid update of. "noisy" is FrameDiff's
        choice: x0 = noisy frame ∘ update, so at high noise the network must place every residue
        absolutely. "previous" (default) anchors the update on the same residue's frame in the
        previous history frame *before* contextual noise (the MD frame in training, the last
        generated frame at inference): x0 = previous ∘ update, so an untrained or unsure network
        predicts "no motion", and what it learns is motion, which transfers across proteins. The
        trunk still sees only the noised history; anchoring on the noised frame instead was
        measured to turn the contextual noise into a random walk of every residue (chains blew
        up to a mean Cα–Cα of 8–10 Å within 10 frames). A noisy frame with no previous frame
        (frame 0 of a training window) falls back to "noisy".
        "posterior" starts from the Gaussian posterior mean of the clean frame given the noisy
        input x_t and a prior centred on that previous frame, N(previous, s² I) with s =
        ``anchor_prior_nm`` for the Cα and ``anchor_prior_rad`` per rotation axis: at high t it is
        the previous frame ("no motion"), at small t the noisy input itself (the identity a
        denoiser needs), in between the exact linear blend (see
        :class:`openmm_starmd.model.anchor.PosteriorAnchor`). Motivation, measured with
        ``training/denoise_check.py``: small "previous" models learnt to ignore x_t altogether
        (their x0 error at t = 0.001 equalled "no motion"'s, 0.93 Å, with x_t itself 0.18 Å away,
        with or without contextual noise); "posterior" gets the small-t identity for free. At 600
        CPU steps its rollouts are worse, though (training/TRAINING.md), so it is not the default.
        Checkpoints written before this option existed load as "noisy".
    anchor_prior_nm, anchor_prior_rad : float
        Prior standard deviations of the "posterior" anchor: per-coordinate Cα displacement (nm)
        and per-axis rotation (rad) between consecutive frames. Measured on our fitted MD windows
        at Δt 0.01–0.14 ns: 0.06–0.08 nm and 0.23–0.26 rad; the defaults (0.1 nm, 0.25 rad) allow
        for the longer steps of Δt ≈ 1 ns. The network learns the correction either way.
    anchor_prior_dt_exponent, anchor_prior_dt_ref_ns : float
        Let the "posterior" prior widen with Δt: both prior widths are multiplied by
        (Δt / ``anchor_prior_dt_ref_ns``)^``anchor_prior_dt_exponent`` (with ``fixed_dt_ns`` set,
        that Δt). 0 (default) keeps them fixed. Motivation (training/TRAINING.md): MD's per-frame
        Cα motion grows with Δt (2M9I: 1.1 Å at 10 ps, 3.2 Å at 1 ns, roughly ∝ Δt^0.25), while
        a fixed prior pulls the base of every prediction to within ~1 Å of the history at any Δt,
        and small trained models were measured to move ~0.8 Å per frame whatever Δt.
    anchor_frames : int
        H, how many of the most recent clean frames (before contextual noise) make the anchor of
        "previous" and the prior centre of "posterior": 1 (default) is the previous frame; H > 1
        their mean (arithmetic for the Cα, chordal for rotations), over the frames available
        (frame f of a training window averages frames max(0, f - H) .. f - 1; a rollout the last
        H frames it appended). Measured on our MD shards, the mean of the last 7 frames predicts
        the next one 20 % better than the last frame (:mod:`openmm_starmd.model.anchor`).
        Ignored by "noisy".
    """

    width: int = 128
    heads: int = 8
    blocks: int = 8
    frame_layers: int = 0
    joint_layers: int = 1
    query_points: int = 4
    value_points: int = 4
    mlp_ratio: float = 2.0
    time_fourier: int = 16
    dt_fourier: int = 8
    window: int = 8
    attention: str = "joint"
    fixed_dt_ns: float | None = None
    contextual_noise: bool = True
    max_chains: int = 16
    chain_offset: int = 10_000
    rope_base_residue: float = 10_000.0
    rope_base_frame: float = 1_000.0
    x0_anchor: str = "previous"
    anchor_prior_nm: float = 0.1
    anchor_prior_rad: float = 0.25
    anchor_frames: int = 1
    anchor_prior_dt_exponent: float = 0.0
    anchor_prior_dt_ref_ns: float = 0.1

    def __post_init__(self):
        if self.attention not in _ATTENTION_MODES:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r} is not a known mode; use one of {_ATTENTION_MODES}."
            )
        if self.x0_anchor not in _ANCHORS:
            raise ValueError(
                f"ModelConfig.x0_anchor={self.x0_anchor!r} is not a known anchor; use one of {_ANCHORS}."
            )
        if not (self.anchor_prior_dt_ref_ns > 0 and 0 <= self.anchor_prior_dt_exponent <= 1):
            raise ValueError(
                f"ModelConfig.anchor_prior_dt_ref_ns={self.anchor_prior_dt_ref_ns} must be > 0 and "
                f"anchor_prior_dt_exponent={self.anchor_prior_dt_exponent} in [0, 1] (0: a fixed prior)."
            )
        if not (self.anchor_prior_nm > 0 and self.anchor_prior_rad > 0):
            raise ValueError(
                f"ModelConfig.anchor_prior_nm={self.anchor_prior_nm} and anchor_prior_rad={self.anchor_prior_rad} must "
                "be > 0 (prior standard deviations in nm and rad)."
            )
        if not (isinstance(self.anchor_frames, int) and self.anchor_frames >= 1):
            raise ValueError(
                f"ModelConfig.anchor_frames={self.anchor_frames!r} must be an integer >= 1 (1: the previous frame; "
                "H > 1: the mean of the last H frames)."
            )
        if self.width % self.heads:
            raise ValueError(
                f"ModelConfig.width={self.width} is not divisible by heads={self.heads}; choose width = heads * head size."
            )
        if (self.width // self.heads) % 4:
            raise ValueError(
                f"ModelConfig head size width/heads={self.width // self.heads} is not divisible by 4, which the 2D RoPE "
                "needs (two axes, pairs); choose width and heads so that width/heads is a multiple of 4."
            )
        if self.window < 1:
            raise ValueError(f"ModelConfig.window={self.window} must be at least 1 frame; use the training window L.")
        if self.fixed_dt_ns is not None and not self.fixed_dt_ns > 0:
            raise ValueError(f"ModelConfig.fixed_dt_ns={self.fixed_dt_ns} must be a positive time in ns, or None.")
        if min(self.blocks, self.query_points, self.value_points) < 1 or self.frame_layers + self.joint_layers < 1:
            raise ValueError(
                "ModelConfig needs at least one block, one layer per block and one query and value point per head; "
                f"got blocks={self.blocks}, frame_layers={self.frame_layers}, joint_layers={self.joint_layers}, "
                f"query_points={self.query_points}, value_points={self.value_points}."
            )

    @property
    def head_dim(self) -> int:
        """Scalar query/key/value size per head."""
        return self.width // self.heads

    @property
    def context_frames(self) -> int:
        """Clean history frames the last noisy frame of a training window attends to: L - 1 (>= 1).

        The default sliding window at inference, so a rollout never conditions on more history
        (or larger relative frame offsets in the RoPE) than training showed the model.
        """
        return max(1, self.window - 1)

    def layer_kinds(self) -> list[str]:
        """Attention kind of every layer, in order: "frame", "time" or "joint"."""
        joint = ["joint"] if self.attention == "joint" else ["frame", "time"]
        block = ["frame"] * self.frame_layers + joint * self.joint_layers
        return block * self.blocks

    @classmethod
    def _upgrade(cls, d: dict) -> dict:
        if "x0_anchor" not in d:  # written before the option existed: those models anchor on the noisy frame
            d["x0_anchor"] = "noisy"
        return d


#: Named sizes. "paper" follows STAR-MD (hidden 256, 8 heads, 4 blocks of one per-frame layer and
#: two joint layers). "default" is the compact model that generates a frame at N=60 residues in
#: <= 0.5 s on 2 CPU cores with the default number of reverse steps (benchmarks/sampler_speed.py).
NAMED_CONFIGS: dict[str, dict] = {
    "paper": dict(width=256, heads=8, blocks=4, frame_layers=1, joint_layers=2, query_points=8, value_points=8,
                  mlp_ratio=4.0),
    "default": dict(width=128, heads=8, blocks=8, frame_layers=0, joint_layers=1, query_points=4, value_points=4,
                    mlp_ratio=2.0),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """A named :class:`ModelConfig` ("paper" or "default"), with optional field overrides."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config name {name!r}; use one of {sorted(NAMED_CONFIGS)}.")
    return ModelConfig(**{**NAMED_CONFIGS[name], **overrides})
