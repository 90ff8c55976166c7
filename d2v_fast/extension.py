"""The compiled extension ``d2v_fast._C`` (``csrc/``), loaded once for all its users: the
data path's masks (``d2v_fast.data.masking``) and the step's autograd nodes
(``d2v_fast.ops.native``). Each user falls back to its Python twin where it is missing."""
from __future__ import annotations

import importlib
import os
import warnings

NO_EXT_ENV = "D2V_FAST_NO_EXT"


def load():
    """Returns the ``d2v_fast._C`` module, or None (with one RuntimeWarning) if it fails;
    None without a word under ``D2V_FAST_NO_EXT=1``."""
    if os.environ.get(NO_EXT_ENV, "0") == "1":
        return None
    try:
        return importlib.import_module("d2v_fast._C")
    except ImportError as exc:
        warnings.warn(
            f"d2v_fast._C could not be imported ({exc}); masking falls back to pure Python "
            "(identical masks, ~300-500x slower) and the step's Linears and LayerNorms to their Python "
            "Functions (same values, more host time). Fix: build the extension with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), "
            f"or set {NO_EXT_ENV}=1 to use the fallback without this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


C = load()


def with_function(module, function: str, fallback: str, stacklevel: int = 3):
    """``module`` (``C``, or what a test puts in its place) if it has ``function``, else None
    with one RuntimeWarning: an extension built from an older checkout, ``fallback`` saying
    what runs instead."""
    if module is None or hasattr(module, function):
        return module
    warnings.warn(f"d2v_fast._C has no {function} (built from an older checkout); {fallback}. Fix: rebuild with "
                  "`pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=stacklevel)
    return None
