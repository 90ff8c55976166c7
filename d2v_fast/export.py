"""Loading the trained encoder back: ``d2v_fast.load_pretrained``."""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import UsageError
from .models.encoder import Encoder, EncoderConfig

_PREFIX = "student.encoder."


def _resolve(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"{path}: no such file or directory; give a run directory, a checkpoint or encoder.pt")
    if (path / "encoder.pt").is_file():
        return path / "encoder.pt"
    if (path / "state.pt").is_file():
        return path / "state.pt"
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise UsageError(f"{path}: holds no encoder.pt and no complete checkpoint; train first or give another path")
    return latest / "state.pt"


def load_pretrained(path, map_location="cpu") -> Encoder:
    f = _resolve(Path(path))
    try:
        obj = torch.load(f, map_location=map_location, weights_only=False)
    except Exception as err:
        raise UsageError(f"{f}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and obj.get("format") == "d2v_fast.encoder":
        cfg, state = obj["encoder_config"], obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and "encoder_config" in obj:
        cfg = obj["encoder_config"]
        state = {k[len(_PREFIX):]: v for k, v in obj["model"].items() if k.startswith(_PREFIX)}
    else:
        raise UsageError(f"{f}: not a d2v_fast checkpoint or encoder export")
    model = Encoder(EncoderConfig(**cfg))
    model.load_state_dict(state)
    return model.eval()
