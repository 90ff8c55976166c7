"""The linear probe of a run directory or a Hugging Face export: find which modality the
directory holds, load its encoder and task through that modality, run the probe's core
(``d2v_fast/linear_probe.py``) and write ``probe.json``. Used by ``python -m d2v_fast.probe``,
by the end of a pretraining job and by the trainer's probe hook; see docs/probe.md."""
from __future__ import annotations

import os
from pathlib import Path

from .linear_probe import FLOOR_INITS, PROBE_FILE, write_result
from .modalities.text import DEFAULT_BATCH, DEFAULT_MAX_LEN, held_out, load_probed, load_task, probe_encoder


def probe_path(path: str | os.PathLike, *, task: str | None = None, seed: int = 0, max_len: int = DEFAULT_MAX_LEN,
               batch_size: int = DEFAULT_BATCH, device: str = "cpu", out: str | os.PathLike | None = None,
               progress: bool = False, floor_inits: int | None = None) -> dict:
    """Probe a run or Hugging Face directory against its random-init floor; a run
    directory (or ``out``) receives ``probe.json``."""
    from .modalities.audio import is_speech_model  # a speech run or export: the built-in speaker task
    from .modalities.images import is_image_model  # an image run or export: its corpus's labels

    if is_image_model(path):
        from .modalities.images import probe_images_path

        return probe_images_path(path, seed=seed, device=device, out=out, floor_inits=floor_inits,
                                 progress=progress)
    if is_speech_model(path):
        from .modalities.audio import probe_speech_path

        return probe_speech_path(path, task=task, seed=seed, device=device, out=out, floor_inits=floor_inits,
                                 progress=progress)
    probed = load_probed(path)
    loaded = load_task(task, progress=progress)
    result = probe_encoder(probed.encoder.to(device), probed.tokenizer, loaded, seed=seed, max_len=max_len,
                           batch_size=batch_size, device=device,
                           floor_inits=FLOOR_INITS if floor_inits is None else floor_inits, progress=progress)
    result = {"model": str(probed.path), "kind": probed.kind, **result,
              "test_held_out_of_pretraining": held_out(probed, loaded)}
    target = Path(out) if out else (probed.path / PROBE_FILE if probed.kind == "run" else None)
    if target is not None:
        write_result(result, target)
    return result
