"""Save and load STAR-MD models: weights plus every config needed to rebuild them.

A checkpoint is one ``torch.save`` file holding only tensors and plain data:

- ``format`` / ``format_version``: identify the file;
- ``model_config``, ``diffusion_config``, ``sampling_config``, ``metadata``: JSON *strings*
  (so the file needs nothing but str/int and tensors to unpickle);
- ``state_dict``: the network's tensors, on CPU.

Loading uses ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, so a file that
tries to run code (a booby-trapped pickle) is refused instead of executed. Saving writes a
temporary file next to the target and renames it, so an interrupted save never leaves a
truncated checkpoint behind.

``load_model()`` without a path loads the bundled default model from ``openmm_starmd/data/``;
names of bundled models are listed in :data:`BUNDLED_MODELS`.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .diffusion import DiffusionConfig, SE3Diffuser
from .model import ModelConfig, StarMDNetwork
from .sampling import SamplingConfig

__all__ = ["LoadedModel", "save_model", "load_model", "BUNDLED_MODELS", "bundled_model_path"]

FORMAT = "openmm-starmd-checkpoint"
FORMAT_VERSION = 1
DATA_DIR = Path(__file__).parent / "data"
#: Bundled models by name -> file in ``openmm_starmd/data/``.
BUNDLED_MODELS = {"default": "starmd_default.pt"}


@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    Attributes
    ----------
    model : StarMDNetwork
        In eval mode, on the requested device.
    diffuser : SE3Diffuser
        Built from the saved diffusion config.
    sampling_config : SamplingConfig
        The saved one, or the defaults if none was saved.
    metadata : dict
        Free-form JSON data saved with the model (training data, steps, ...).
    model_config : ModelConfig
    diffusion_config : DiffusionConfig
    """

    model: StarMDNetwork
    diffuser: SE3Diffuser
    sampling_config: SamplingConfig
    metadata: dict
    model_config: ModelConfig
    diffusion_config: DiffusionConfig


def _json(value, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON-serialisable ({err}); pass plain dicts, lists, str, numbers, bools and None.") from None


def save_model(path, model: StarMDNetwork, diffusion_config: DiffusionConfig, sampling_config: SamplingConfig | None = None,
               metadata: dict | None = None) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file (conventionally ``*.pt``); its directory must exist.
    model : StarMDNetwork
    diffusion_config : DiffusionConfig
    sampling_config : SamplingConfig, optional
        Recommended sampling settings for this model.
    metadata : dict, optional
        JSON-serialisable information (training data, steps, losses, ...).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: directory {path.parent} does not exist; create it first.")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": _json(model.config.to_dict(), "model config"),
        "diffusion_config": _json(diffusion_config.to_dict(), "diffusion config"),
        "sampling_config": _json(None if sampling_config is None else sampling_config.to_dict(), "sampling config"),
        "metadata": _json(metadata or {}, "metadata"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def bundled_model_path(name: str = "default") -> Path:
    """File of a bundled model; raises FileNotFoundError if it is not installed."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"no bundled model named {name!r}; bundled names are {sorted(BUNDLED_MODELS)}, or pass a checkpoint path.")
    path = DATA_DIR / BUNDLED_MODELS[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled {name!r} model ({path}) is not installed in this copy of openmm-starmd; "
            "pass the path of a checkpoint written by save_model() instead."
        )
    return path


def load_model(path=None, device="cpu") -> LoadedModel:
    """Load a checkpoint safely (no code execution) and rebuild model, diffuser and configs.

    Parameters
    ----------
    path : str, os.PathLike or None
        A checkpoint file, a bundled model name (see :data:`BUNDLED_MODELS`), or None for the
        bundled default.
    device : str or torch.device

    Returns
    -------
    LoadedModel
    """
    if path is None or (isinstance(path, str) and path in BUNDLED_MODELS and not Path(path).exists()):
        path = bundled_model_path(path or "default")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a file written by save_model().")
    try:
        with warnings.catch_warnings():
            # a foreign pickle's protocol warning is noise: the file is refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {path} contains objects other than tensors and plain data, so it was not loaded "
            f"(it could run code); only load files written by save_model(). Detail: {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"checkpoint {path} is not a readable torch file ({err}); it may be truncated or not a checkpoint.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an openmm-starmd checkpoint (no '{FORMAT}' marker); pass a file written by save_model().")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {payload.get('format_version')!r}, this openmm-starmd reads "
            f"version {FORMAT_VERSION}; use the openmm-starmd version that wrote it."
        )
    model_config = ModelConfig.from_dict(json.loads(payload["model_config"]))
    diffusion_config = DiffusionConfig.from_dict(json.loads(payload["diffusion_config"]))
    sampling = json.loads(payload["sampling_config"])
    sampling_config = SamplingConfig() if sampling is None else SamplingConfig.from_dict(sampling)
    model = StarMDNetwork(model_config, diffusion_config)
    state = payload["state_dict"]
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = model.to(dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its model config: missing {sorted(missing)}, unexpected {sorted(unexpected)}; "
            "it was written by an incompatible openmm-starmd version."
        )
    model = model.to(device).eval()
    return LoadedModel(model, SE3Diffuser(diffusion_config), sampling_config, json.loads(payload["metadata"]),
                       model_config, diffusion_config)
