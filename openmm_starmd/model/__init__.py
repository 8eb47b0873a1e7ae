"""The STAR-MD network: tokens, joint spatio-temporal invariant point attention with 2D RoPE,
AdaLN conditioning, the block-causal mask and the KV cache. Imports geometry only."""
from .config import NAMED_CONFIGS, ModelConfig, model_config
from .network import Rollout, StarMDNetwork
from .sequence import ResidueFeatures, TokenSequence, training_sequence

__all__ = [
    "ModelConfig",
    "NAMED_CONFIGS",
    "model_config",
    "StarMDNetwork",
    "Rollout",
    "ResidueFeatures",
    "TokenSequence",
    "training_sequence",
]
