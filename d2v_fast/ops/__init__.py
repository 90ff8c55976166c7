"""The data2vec hot-path operations, as one functional API.

These are vectorised PyTorch implementations (whole batch, all K layers at once). Fused
Triton versions with the same signatures are the next milestone; the plain eager twins
that define the semantics live in ``d2v_fast.reference``.
"""
from .core import build_targets, ema_update_, regression_loss, representation_std

__all__ = ["build_targets", "ema_update_", "regression_loss", "representation_std"]
