"""Checkpoints (``RUN/checkpoints/step-XXXXXXXX/``) and the run's encoder file: how they are
written, read back without running any code from them, and converted from the older format.

A checkpoint directory holds

- ``model.safetensors``: student, teacher and head weights, full (unsharded) state dicts;
- ``config.json``: format version, step, run config, corpus, encoder config, world size and
  the sha256 of ``model.safetensors``;
- ``state.pt``: optimizer, LR schedule, data position and counters;
- ``rng-rankR.pt``: each rank's RNG states (torch, Python, NumPy, CUDA) as tensors and ints.

The ``.pt`` files hold only tensors and plain values and are read with
``torch.load(weights_only=True)``; safetensors and JSON cannot carry code at all. Every
reader checks the format version, the keys, shapes and dtypes against what the model needs
and answers a mismatch with a UsageError naming the file and the fix.

A checkpoint is assembled in ``.step-XXXXXXXX.partial``, fsynced, and renamed to its final
name: a directory with the final name is complete by construction, whatever moment a crash hits.

Older checkpoints and ``encoder.pt`` files of this project were whole pickles, which can run
code when opened, so they are no longer loaded; ``python -m d2v_fast.checkpoint convert PATH``
rewrites them once into this format (reading them as tensors and plain values only).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from .errors import UsageError, cli_entry
from .files import fsync_dir, like_other_files

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")

# 1: one pickled state.pt (and encoder.pt), before this format; 2: safetensors + JSON + weights-only .pt
FORMAT_VERSION = 2
MODEL_FILE, META_FILE, STATE_FILE = "model.safetensors", "config.json", "state.pt"
ENCODER_FILE, ENCODER_META = "encoder.safetensors", "encoder.json"
LEGACY_ENCODER = "encoder.pt"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- writing
def _atomic_write(path: Path, write) -> None:
    """``write(f)`` into ``path.tmp``, fsync, rename over ``path``: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: Path) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    """Writes ``tensors`` atomically; returns the file's sha256 (read back from the page cache)."""
    from safetensors.torch import save_file

    own = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (the flat EMA buffers hold views): copy those
        own[k] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(own, str(tmp), metadata=metadata)
    like_other_files(tmp)  # not safetensors' 0600
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    sha = sha256_file(tmp)
    os.replace(tmp, path)
    return sha


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading, checked
def _legacy_fix(path: Path) -> str:
    return (f"it is in the older pickle format, which d2v_fast no longer opens (a pickle can run code when "
            f"loaded); convert it once (the conversion reads only tensors and plain values): "
            f"python -m d2v_fast.checkpoint convert {path}")


def load_plain(path: Path, fix: str, *, allow=()) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain values, never code. ``allow``: extra
    classes for one format's needs (only the legacy RNG files' NumPy arrays use it)."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allow)):
            warnings.simplefilter("ignore")  # pickle-protocol notices would break the one-line answer
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; {fix}") from None
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip
        text = str(err)
        why = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if why or "Weights only load failed" in text:
            what = f"it holds {why.group(1)}" if why else "it holds objects other than tensors and plain values"
            raise UsageError(f"{path}: refused, {what} (nothing in it was run); d2v_fast did not write it "
                             f"or it was altered; {fix}") from None
        raise UsageError(f"{path}: unreadable ({type(err).__name__}: {text.splitlines()[0] if text else ''}); "
                         f"it is damaged or cut short; {fix}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: holds a {type(obj).__name__}, not a d2v_fast file; {fix}")
    return obj


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path: Path, fix: str, *, sha256: str | None = None,
                     expected: dict[str, tuple[tuple, torch.dtype]] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` after checking its sha256 (when recorded), its header and, when
    given, that its keys, shapes and dtypes are exactly ``expected`` ({name: (shape, dtype)})."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: missing; {fix}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise UsageError(f"{path}: its sha256 differs from the one recorded when it was written (the file "
                         f"was altered or damaged); {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}); "
                         f"it is damaged or cut short; {fix}") from None
    if expected is not None:
        check_tensors({k: (s, _DTYPES.get(d, d)) for k, (s, d) in found.items()}, expected, path, fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}); {fix}") from None


def tensor_spec(tensors: dict) -> dict[str, tuple[tuple, torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def check_tensors(found: dict, expected: dict, path, fix: str) -> None:
    """``found`` and ``expected`` map names to (shape, dtype); the first difference is an error."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise UsageError(f"{path}: lacks {len(missing)} tensor(s) this model needs, e.g. {missing[0]}; {fix}")
    if extra:
        raise UsageError(f"{path}: holds {len(extra)} tensor(s) this model does not have, e.g. {extra[0]}; {fix}")
    for k, (shape, dtype) in expected.items():
        if tuple(found[k][0]) != tuple(shape):
            raise UsageError(f"{path}: {k} has shape {list(found[k][0])}, this model needs {list(shape)}; {fix}")
        if found[k][1] != dtype:
            raise UsageError(f"{path}: {k} is {found[k][1]}, this model needs {dtype}; {fix}")


def _check_version(path: Path, meta: dict, kind: str, fix_legacy: Path) -> None:
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise UsageError(f"{path}: {_legacy_fix(fix_legacy)}")
    version = meta["format_version"]
    if meta.get("format") != kind or not isinstance(version, int):
        raise UsageError(f"{path}: not a {kind} file (format {meta.get('format')!r}); give a d2v_fast run "
                         f"directory, checkpoint or encoder")
    if version > FORMAT_VERSION:
        raise UsageError(f"{path}: written by a newer d2v_fast (format {version}; this one reads "
                         f"{FORMAT_VERSION}); upgrade d2v_fast to load it")
    if version < FORMAT_VERSION:
        raise UsageError(f"{path}: format {version}; {_legacy_fix(fix_legacy)}")


def _read_json(path: Path, fix: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({type(err).__name__}); {fix}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: holds a JSON {type(obj).__name__}, expected an object; {fix}")
    return obj


def _require(path, obj: dict, fields: dict, fix: str) -> None:
    for name, typ in fields.items():
        if name not in obj:
            raise UsageError(f"{path}: lacks {name!r}; {fix}")
        if not isinstance(obj[name], typ) or (typ is int and isinstance(obj[name], bool)):
            raise UsageError(f"{path}: {name!r} is a {type(obj[name]).__name__}; {fix}")


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's RNG states as tensors and ints, loadable with weights_only=True."""
    import random

    import numpy as np

    version, words, gauss = random.getstate()
    npst = np.random.get_state(legacy=False)
    state = {"format": "d2v_fast.rng", "format_version": FORMAT_VERSION, "torch": torch.get_rng_state(),
             "python": [version, list(words), gauss],
             "numpy": {"key": torch.from_numpy(npst["state"]["key"].astype(np.int64)), "pos": int(npst["state"]["pos"]),
                       "has_gauss": int(npst["has_gauss"]), "gauss": float(npst["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                               "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _check_rng(path: Path, state: dict, fix: str) -> None:
    _check_version(path, state, "d2v_fast.rng", path.parent.parent.parent)
    _require(path, state, {"torch": torch.Tensor, "python": list, "numpy": dict}, fix)
    ok = state["torch"].dtype == torch.uint8 and state["torch"].shape == torch.get_rng_state().shape
    py = state["python"]
    ok = ok and len(py) == 3 and isinstance(py[1], list) and len(py[1]) == 625 and \
        all(isinstance(w, int) for w in py[1]) and isinstance(py[2], (float, type(None)))
    n = state["numpy"]
    ok = ok and isinstance(n.get("key"), torch.Tensor) and tuple(n["key"].shape) == (624,) and \
        all(isinstance(n.get(k), t) for k, t in (("pos", int), ("has_gauss", int), ("gauss", float)))
    ok = ok and ("cuda" not in state or (isinstance(state["cuda"], torch.Tensor) and state["cuda"].dtype == torch.uint8))
    if not ok:
        raise UsageError(f"{path}: not the RNG states d2v_fast writes; {fix}")


# ----------------------------------------------------------------------------- checkpoints
_STATE_FIELDS = {"optimizer": dict, "scheduler": dict, "step": int, "epoch": int, "position": int,
                 "attempts": int, "skipped": int, "world_size": int, "parallel": str}
_META_FIELDS = {"step": int, "config": dict, "encoder_config": dict, "model_sha256": str}
# what of Trainer.state() goes to config.json (JSON, readable without the weights)
_META_KEYS = ("step", "config", "corpus", "world_size", "parallel", "encoder_config")


def save_checkpoint(run_dir: Path, step: int, state: dict, *, rank: int, barrier, keep_last: int) -> Path:
    """Collective: every rank calls it. ``state`` (``Trainer.state()``) is only used on rank 0."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    atomic_torch_save(rng_state(), staging / f"rng-rank{rank}.pt")
    if rank == 0:
        write_checkpoint_files(staging, state)
    barrier()
    if rank == 0:
        fsync_dir(staging)
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_dir(root)
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def write_checkpoint_files(directory: Path, state: dict) -> None:
    """model.safetensors, state.pt and config.json of one checkpoint (not the RNG files)."""
    sha = atomic_save_safetensors(state["model"], directory / MODEL_FILE,
                                  {"format": "d2v_fast.model", "format_version": str(FORMAT_VERSION)})
    atomic_torch_save({"format": "d2v_fast.train_state", "format_version": FORMAT_VERSION,
                       **{k: state[k] for k in _STATE_FIELDS}}, directory / STATE_FILE)
    meta = {"format": "d2v_fast.checkpoint", "format_version": FORMAT_VERSION,
            **{k: state.get(k) for k in _META_KEYS}, "model_sha256": sha}
    atomic_write_json(meta, directory / META_FILE)


def _fix_ckpt(path: Path) -> str:
    return f"use an earlier checkpoint than {Path(path).name} (delete this one) or start a new --out"


def read_checkpoint_meta(path: Path) -> dict:
    """The checkpoint's config.json, checked: a readable, current-format d2v_fast checkpoint."""
    path = Path(path)
    f = path / META_FILE
    run_dir = path.parent.parent
    if not f.is_file() and (path / STATE_FILE).is_file():
        raise UsageError(f"{path}: {_legacy_fix(run_dir)}")
    meta = _read_json(f, _fix_ckpt(path))
    _check_version(f, meta, "d2v_fast.checkpoint", run_dir)
    _require(f, meta, _META_FIELDS, _fix_ckpt(path))
    return meta


def load_model_weights(path: Path, expected: dict | None = None, meta: dict | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's full model state dict; ``expected`` ({name: (shape, dtype)}) when known."""
    meta = meta or read_checkpoint_meta(path)
    return read_safetensors(Path(path) / MODEL_FILE, _fix_ckpt(path), sha256=meta["model_sha256"], expected=expected)


def _like(value, template) -> bool:
    """``value`` has ``template``'s structure: same keys, list lengths and value types."""
    if isinstance(template, dict):
        return isinstance(value, dict) and value.keys() == template.keys() and \
            all(_like(value[k], template[k]) for k in template)
    if isinstance(template, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(template) and \
            all(_like(v, t) for v, t in zip(value, template))
    if isinstance(template, bool) or template is None:
        return type(value) is type(template)
    if isinstance(template, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(template))


def _check_optimizer(f: Path, opt: dict, params: dict[str, tuple], fix: str) -> None:
    """Adam moments for known parameters with their shapes; groups naming known parameters."""
    if set(opt) != {"state", "param_groups"} or not isinstance(opt["state"], dict) \
            or not isinstance(opt["param_groups"], list):
        raise UsageError(f"{f}: the optimizer state is not an AdamW state dict; {fix}")
    for name, st in opt["state"].items():
        if name not in params:
            raise UsageError(f"{f}: optimizer state for {name!r}, which this model does not have; {fix}")
        if not isinstance(st, dict) or not all(isinstance(v, torch.Tensor) for v in st.values()):
            raise UsageError(f"{f}: the optimizer state of {name} is not a dict of tensors; {fix}")
        for k, v in st.items():
            if k != "step" and tuple(v.shape) != tuple(params[name]):
                raise UsageError(f"{f}: optimizer {k} of {name} has shape {list(v.shape)}, the parameter "
                                 f"{list(params[name])}; {fix}")
    for group in opt["param_groups"]:
        names = group.get("params") if isinstance(group, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) and n in params for n in names):
            raise UsageError(f"{f}: an optimizer parameter group names parameters this model does not have; {fix}")


def load_train_state(path: Path, *, params: dict[str, tuple] | None = None, scheduler: dict | None = None) -> dict:
    """state.pt, checked; ``params`` ({optimizer parameter name: shape}) and ``scheduler`` (a
    state dict of the scheduler it will be loaded into) when known."""
    f = Path(path) / STATE_FILE
    fix = _fix_ckpt(path)
    state = load_plain(f, fix)
    _check_version(f, state, "d2v_fast.train_state", Path(path).parent.parent)
    _require(f, state, _STATE_FIELDS, fix)
    if params is not None:
        _check_optimizer(f, state["optimizer"], params, fix)
    if scheduler is not None and not _like(state["scheduler"], scheduler):
        raise UsageError(f"{f}: the LR schedule state has other fields than this run's scheduler; {fix}")
    return state


def load_checkpoint(path: Path, *, model: dict | None = None, params: dict | None = None,
                    scheduler: dict | None = None, train_state: bool = True) -> dict:
    """Everything ``Trainer.state()`` wrote, checked, as one dict (``model``: the weights)."""
    meta = read_checkpoint_meta(path)
    out = dict(meta)
    if train_state:
        out.update({k: v for k, v in load_train_state(path, params=params, scheduler=scheduler).items()
                    if k not in ("format", "format_version")})
    out["model"] = load_model_weights(path, model, meta)
    return out


def load_rng(path: Path, rank: int) -> dict | None:
    f = Path(path) / f"rng-rank{rank}.pt"
    if not f.is_file():
        return None
    state = load_plain(f, _fix_ckpt(path))
    _check_rng(f, state, _fix_ckpt(path))
    return state


# ----------------------------------------------------------------------------- the encoder file
def save_encoder(weights_path: Path, state_dict: dict, encoder_config: dict, step: int,
                 modality: str = "text") -> Path:
    """``NAME.safetensors`` (Hugging Face parameter names) and ``NAME.json`` beside it (config, step,
    sha256). The JSON is renamed last; a crash between the two renames leaves a pair whose
    checksums disagree, which the reader refuses."""
    weights_path = Path(weights_path)
    sha = atomic_save_safetensors(state_dict, weights_path,
                                  {"format": "d2v_fast.encoder", "format_version": str(FORMAT_VERSION)})
    atomic_write_json({"format": "d2v_fast.encoder", "format_version": FORMAT_VERSION, "weights": weights_path.name,
                       "sha256": sha, "step": step, "modality": modality, "encoder_config": encoder_config},
                      weights_path.with_suffix(".json"))
    fsync_dir(weights_path.parent)
    return weights_path


def read_encoder(meta_path: Path, expected_for) -> tuple[dict, dict[str, torch.Tensor]]:
    """(encoder_config, weights) of an encoder JSON and the safetensors it names;
    ``expected_for(encoder_config)`` gives the {name: (shape, dtype)} to check against."""
    meta_path = Path(meta_path)
    fix = (f"re-run the training command to rewrite it, or load a checkpoint instead "
           f"(load_pretrained('{meta_path.parent / CKPT_DIR}/step-XXXXXXXX'))")
    meta = _read_json(meta_path, fix)
    _check_version(meta_path, meta, "d2v_fast.encoder", meta_path.with_suffix(".pt"))
    _require(meta_path, meta, {"weights": str, "sha256": str, "encoder_config": dict}, fix)
    if Path(meta["weights"]).name != meta["weights"]:
        raise UsageError(f"{meta_path}: 'weights' must name a file beside it, not {meta['weights']!r}; {fix}")
    expected = expected_for(meta["encoder_config"], meta_path)
    return meta["encoder_config"], read_safetensors(meta_path.parent / meta["weights"], fix,
                                                    sha256=meta["sha256"], expected=expected)


# ----------------------------------------------------------------------------- converting older files
def _legacy_numpy_globals() -> list:
    """What a pickled ``np.random.get_state()`` needs: an ndarray of uint32. Nothing callable beyond it."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _legacy_rng(f: Path) -> dict:
    """An older rng-rankR.pt (Python and NumPy states as pickled tuples) in today's form."""
    old = load_plain(f, "it cannot be converted", allow=_legacy_numpy_globals())
    try:
        version, words, gauss = old["python"]
        name, key, pos, has_gauss, gauss_np = old["numpy"]
        assert name == "MT19937" and tuple(key.shape) == (624,)
        new = {"format": "d2v_fast.rng", "format_version": FORMAT_VERSION, "torch": old["torch"],
               "python": [int(version), [int(w) for w in words], gauss],
               "numpy": {"key": torch.from_numpy(key.astype("int64")), "pos": int(pos),
                         "has_gauss": int(has_gauss), "gauss": float(gauss_np)}}
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError):
        raise UsageError(f"{f}: not the RNG states an older d2v_fast wrote; it cannot be converted") from None
    if "cuda" in old:
        new["cuda"] = old["cuda"]
    return new


def convert_checkpoint(ckpt_dir: Path) -> bool:
    """Rewrites one older checkpoint directory in today's format; False when it already is."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / META_FILE).is_file() and "format_version" in _read_json(ckpt_dir / META_FILE, "convert it again"):
        read_checkpoint_meta(ckpt_dir)  # current (or newer): say so if it is not readable
        return False
    fix = "it cannot be converted"
    old = load_plain(ckpt_dir / STATE_FILE, fix)
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "epoch", "position", "encoder_config")
               if k not in old]
    if missing or not isinstance(old["model"], dict):
        raise UsageError(f"{ckpt_dir / STATE_FILE}: not an older d2v_fast checkpoint (lacks {missing[:1] or 'model'}); "
                         f"{fix}")
    state = {"attempts": old["step"], "skipped": 0, "world_size": 1, "parallel": "ddp", "corpus": None, "config": {}}
    state.update({k: v for k, v in old.items() if v is not None})
    staging = ckpt_dir.with_name(f".{ckpt_dir.name}.converting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_checkpoint_files(staging, state)
        for f in sorted(ckpt_dir.glob("rng-rank*.pt")):
            atomic_torch_save(_legacy_rng(f), staging / f.name)
        fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = ckpt_dir.with_name(f".{ckpt_dir.name}.legacy")
    os.rename(ckpt_dir, backup)  # the new directory takes the old one's place, then the old one goes
    os.rename(staging, ckpt_dir)
    fsync_dir(ckpt_dir.parent)
    shutil.rmtree(backup)
    return True


def convert_encoder(path: Path) -> Path:
    """An older ``NAME.pt`` encoder export becomes ``NAME.safetensors`` + ``NAME.json``; the .pt is removed."""
    path = Path(path)
    old = load_plain(path, "it cannot be converted")
    if old.get("format") != "d2v_fast.encoder" or not isinstance(old.get("state_dict"), dict) \
            or not isinstance(old.get("encoder_config"), dict):
        raise UsageError(f"{path}: not an encoder export of an older d2v_fast; it cannot be converted")
    out = save_encoder(path.with_suffix(".safetensors"), old["state_dict"], old["encoder_config"],
                       int(old.get("step") or 0))
    path.unlink()
    return out


def convert(path: Path, say=print) -> int:
    """Converts a run directory (every checkpoint and encoder.pt), one checkpoint or one
    encoder .pt file; returns how many were rewritten."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"PATH {path}: no such file or directory; give a run directory, checkpoint or encoder.pt")
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if path.is_file():
        out = convert_encoder(path)
        say(f"converted {path} -> {out} and {out.with_suffix('.json')}")
        return 1
    if (path / STATE_FILE).is_file():
        ckpts = [path]
    else:
        ckpts = [p for _, p in complete_checkpoints(path)]
    done = 0
    for c in ckpts:
        if convert_checkpoint(c):
            say(f"converted {c}: model.safetensors, config.json, state.pt and rng-rank*.pt rewritten")
            done += 1
    if (path / LEGACY_ENCODER).is_file():
        out = convert_encoder(path / LEGACY_ENCODER)
        say(f"converted {path / LEGACY_ENCODER} -> {out.name} and {out.with_suffix('.json').name}")
        done += 1
    if not ckpts and done == 0:
        raise UsageError(f"PATH {path}: holds no checkpoint or encoder.pt; give a run directory, checkpoint or encoder.pt")
    return done


def build_parser():
    from .config import _Parser

    p = _Parser(prog="python -m d2v_fast.checkpoint",
                description="Convert run directories, checkpoints and encoder.pt files written by an older "
                            "d2v_fast (whole pickles) into today's format (safetensors + JSON + weights-only .pt). "
                            "The old files are read as tensors and plain values only (torch.load with "
                            "weights_only=True; NumPy's uint32 array for the RNG states), so nothing in them is "
                            "run; a file holding anything else is refused. Each converted checkpoint replaces "
                            "the old one in place; encoder.pt becomes encoder.safetensors + encoder.json.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite older files in place")
    c.add_argument("paths", nargs="+", metavar="PATH", help="run directory, checkpoint directory or encoder.pt")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    total = 0
    for path in args.paths:
        total += convert(Path(path), say=lambda m: print(m, file=sys.stderr))
    print(f"{total} file set(s) converted; nothing in them was run", file=sys.stderr)
    return 0


# Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = {
    "train": {"max_steps", "log_every", "ckpt_every", "keep_last", "progress", "out", "max_skipped_steps",
              "collapse_warmup", "min_target_var", "min_pred_var", "device", "micro_batch_size",
              "parallel", "max_skipped_steps", "kernels"},
    "data": {"path", "num_workers", "verify"},
}


def config_difference(saved: dict, current: dict) -> str | None:
    """First field (``section.field: saved -> current``) that forbids resuming, else None."""
    theirs, ours = saved.get("modality", "text"), current.get("modality", "text")  # older runs: text
    if theirs != ours:
        return f"modality: {theirs!r} there, {ours!r} now"
    for section, fields in current.items():
        if not isinstance(fields, dict):
            continue
        for name, value in fields.items():
            if name in RESUMABLE_CHANGES.get(section, ()):
                continue
            old = saved.get(section, {}).get(name, value)
            if isinstance(old, list):
                old = tuple(old)
            if isinstance(value, list):
                value = tuple(value)
            if old != value:
                return f"{section}.{name}: {old!r} there, {value!r} now"
    return None


if __name__ == "__main__":
    sys.exit(main())
