"""Checkpoints: ``RUN/checkpoints/step-XXXXXXXX/`` directories.

A checkpoint is assembled in ``.step-XXXXXXXX.partial`` (rank 0 writes ``state.pt``, every
rank its ``rng-rankR.pt``), fsynced, and renamed to its final name: a directory with the
final name is complete by construction, whatever moment a crash hits.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .files import fsync_dir

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict, *, rank: int, barrier, keep_last: int) -> Path:
    """Collective: every rank calls it. ``state`` is only used on rank 0."""
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
        atomic_torch_save(state, staging / "state.pt")
        # small, so a resume can compare configs without loading the weights
        meta = {"step": step, "config": state.get("config"), "corpus": state.get("corpus"),
                "world_size": state.get("world_size")}
        (staging / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
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


def load_state(path: Path, device="cpu") -> dict:
    return torch.load(Path(path) / "state.pt", map_location=device, weights_only=False)


def load_rng(path: Path, rank: int) -> dict | None:
    f = Path(path) / f"rng-rank{rank}.pt"
    return torch.load(f, weights_only=False) if f.is_file() else None


def read_checkpoint_meta(path: Path) -> dict:
    f = Path(path) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


# Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = {
    "train": {"max_steps", "log_every", "ckpt_every", "keep_last", "progress", "out", "max_skipped_steps",
              "collapse_warmup", "min_target_var", "min_pred_var", "device", "micro_batch_size",
              "parallel", "max_skipped_steps", "kernels"},
    "data": {"path", "num_workers", "verify"},
}


def config_difference(saved: dict, current: dict) -> str | None:
    """First field (``section.field: saved -> current``) that forbids resuming, else None."""
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
