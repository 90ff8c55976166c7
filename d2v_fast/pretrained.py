"""Finding and loading what pretraining wrote: the checkpoint a run directory resolves to, its
encoder weights (the student's, or the teacher's completed by what the modality shares), and
``load_pretrained``. Every file is checked (format version, checksum, keys, shapes, dtypes)
and none can run code; see docs/reliability.md."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import UsageError


_STUDENT = "student.encoder."
_TEACHER = "teacher."


def resolve_checkpoint(path: str | os.PathLike, *, flag: str = "CHECKPOINT") -> Path:
    """A checkpoint directory (holding state.pt) from a run dir, checkpoint dir or a file in one."""
    path = Path(path)
    if path.is_file() and path.name in (ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.META_FILE) \
            and (path.parent / ckpt.STATE_FILE).is_file():
        return path.parent
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file or directory; give a run directory or a checkpoint")
    if path.is_dir() and (path / "state.pt").is_file():
        if path.name.endswith(".partial"):
            raise UsageError(f"{flag} {path}: an incomplete checkpoint (its write never finished); "
                             f"give the run directory to use its newest complete checkpoint")
        return path
    if path.is_dir():
        latest = ckpt.latest_checkpoint(path)
        if latest is not None:
            return latest
        partial = list(ckpt.checkpoint_root(path).glob(".*.partial")) if ckpt.checkpoint_root(path).is_dir() else []
        what = "only an incomplete checkpoint" if partial else "no checkpoint"
        raise UsageError(f"{flag} {path}: holds {what}; train longer (checkpoints are written every "
                         f"--train.ckpt_every steps and at the end) or give another run directory")
    raise UsageError(f"{flag} {path}: not a run directory or checkpoint")


def modality_of(state_or_config: dict):
    """The modality a checkpoint's state (or its saved config) was trained on; older runs are text."""
    from .modalities import get_modality

    config = state_or_config.get("config", state_or_config) if isinstance(state_or_config, dict) else {}
    return get_modality((config or {}).get("modality", "text"), flag="config.json modality")


def _load_state(ckpt_dir: Path) -> dict:
    """The checkpoint's config.json fields and its weights (``model``); state.pt is not needed."""
    state = ckpt.load_checkpoint(ckpt_dir, train_state=False)
    modality = modality_of(state)
    expected = _encoder_spec(state["encoder_config"], ckpt_dir / ckpt.META_FILE, modality)
    fix = f"use an earlier checkpoint than {ckpt_dir.name}"
    ckpt.check_tensors(ckpt.tensor_spec(encoder_weights(state, "student")), expected, ckpt_dir / ckpt.MODEL_FILE, fix)
    ckpt.check_tensors(ckpt.tensor_spec(encoder_weights(state, "teacher")), expected, ckpt_dir / ckpt.MODEL_FILE, fix)
    return state


def _encoder_spec(encoder_config: dict, where, modality=None) -> dict:
    """{name: (shape, dtype)} of the encoder that ``encoder_config`` describes, built on the meta
    device so that a config with absurd sizes costs no memory before it is refused."""
    if modality is None:
        from .modalities import get_modality

        modality = get_modality("text")
    try:
        cfg = modality.encoder_config_from_dict(encoder_config)
        with torch.device("meta"):
            model = modality.build_encoder(cfg)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UsageError(f"{where}: its encoder_config does not describe an encoder ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the file is damaged or was edited") from None
    return ckpt.tensor_spec(model.state_dict())


def encoder_weights(state: dict, which: str = "student") -> dict[str, torch.Tensor]:
    """Encoder parameters under Hugging Face names: the student's, or the teacher's averaged
    weights completed by what the modality's teacher shares with the student."""
    model = state["model"]
    student = {k[len(_STUDENT):]: v for k, v in model.items() if k.startswith(_STUDENT)}
    if which == "student":
        return student
    teacher = {k[len(_TEACHER):]: v for k, v in model.items() if k.startswith(_TEACHER)}
    return modality_of(state).teacher_encoder_weights(student, teacher)


def load_pretrained(path, map_location="cpu") -> torch.nn.Module:
    """The student encoder of a run directory (its encoder.safetensors, else its newest complete
    checkpoint), a checkpoint directory, or an encoder.safetensors / encoder.json file. Every file
    is checked (format version, checksum, keys, shapes, dtypes) and none can run code."""
    path = Path(path)
    if path.is_dir() and (path / ckpt.ENCODER_META).is_file():
        meta = path / ckpt.ENCODER_META
    elif path.is_dir() and (path / ckpt.LEGACY_ENCODER).is_file():
        raise UsageError(f"load_pretrained {path}: its {ckpt.LEGACY_ENCODER} is in the older pickle format, which "
                         f"d2v_fast no longer opens (a pickle can run code when loaded); convert the run once (the "
                         f"conversion reads only tensors and plain values): "
                         f"python -m d2v_fast.checkpoint convert {path}")
    elif path.is_file() and path.suffix in (".safetensors", ".json") and path.parent.joinpath(
            path.stem + ".json").is_file() and path.name not in (ckpt.MODEL_FILE, ckpt.META_FILE):
        meta = path.with_suffix(".json")
    elif path.is_file() and path.name not in (ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.META_FILE):
        raise UsageError(f"load_pretrained {path}: not a d2v_fast encoder (encoder.safetensors + encoder.json) or "
                         f"checkpoint; d2v_fast opens no pickle files (they can run code); an encoder.pt of an older "
                         f"d2v_fast converts once with: python -m d2v_fast.checkpoint convert {path}")
    else:
        meta = None
    if meta is not None:
        try:
            name = json.loads(meta.read_text()).get("modality", "text")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            name = "text"  # read_encoder below reports what is wrong with the file
        from .modalities import get_modality

        modality = get_modality(name if isinstance(name, str) else "text", flag=f"{meta} modality")
        cfg, weights = ckpt.read_encoder(meta, lambda c, where: _encoder_spec(c, where, modality))
    else:
        ckpt_dir = resolve_checkpoint(path, flag="load_pretrained")
        state = ckpt.load_checkpoint(ckpt_dir, train_state=False)
        modality = modality_of(state)
        cfg, weights = state["encoder_config"], encoder_weights(state, "student")
        ckpt.check_tensors(ckpt.tensor_spec(weights), _encoder_spec(cfg, ckpt_dir / ckpt.META_FILE, modality),
                           ckpt_dir / ckpt.MODEL_FILE, f"use an earlier checkpoint than {ckpt_dir.name}")
    model = modality.build_encoder(modality.encoder_config_from_dict(cfg))
    model.load_state_dict(weights)
    return model.to(map_location).eval()


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, weights: str = "student",
           dtype: str = "float32") -> Path:
    """Write the checkpoint's encoder as a Hugging Face model directory of its modality."""
    if weights not in ("student", "teacher"):
        raise UsageError(f"--weights {weights!r}: expected student or teacher")
    from .hf_text import DTYPES, _run_dir

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    ckpt_dir = resolve_checkpoint(checkpoint)
    state = _load_state(ckpt_dir)
    tensors = encoder_weights(state, weights)
    state = dict(state, _checkpoint_dir=ckpt_dir, _weights=weights)
    out = Path(out_dir)
    modality_of(state).export_hf(tensors, state["encoder_config"], out, dtype=dtype, run_dir=_run_dir(ckpt_dir),
                                 state=state)
    return out
