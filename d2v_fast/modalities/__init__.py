"""Modalities: what the core (trainer, recipes, checkpoints, export CLI) asks of text, speech
and images. A modality supplies its encoder config and presets, its corpus and loader (with
masks made in the loader workers), its students for both recipes, its FLOP count and its
Hugging Face interop; the core holds no token, waveform or pixel assumption.

``get_modality(name)`` imports a modality's module only when it is asked for, so a text run
never imports the audio or image stacks.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError

# name -> "module:Class"
MODALITIES = {
    "text": "d2v_fast.modalities.text:TextModality",
    "audio": "d2v_fast.modalities.audio:AudioModality",
    "images": "d2v_fast.modalities.images:ImagesModality",
}

_CACHE: dict[str, "Modality"] = {}


def get_modality(name: str, *, flag: str = "--modality") -> "Modality":
    if name not in MODALITIES:
        raise UsageError(f"{flag} {name!r}: unknown modality; choose one of {', '.join(MODALITIES)}")
    if name not in _CACHE:
        module, cls = MODALITIES[name].split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            raise UsageError(f"{flag} {name}: not available in this build of d2v_fast") from None
        _CACHE[name] = getattr(mod, cls)()
    return _CACHE[name]


class Modality:
    """The pieces a modality supplies. Methods raising NotImplementedError are required."""

    name: str = ""
    unit: str = "tokens"  # what throughput counts: tokens | frames | patches
    model_config_class: type = object  # the dataclass of the ``model`` config section
    encoder_presets: dict[str, dict] = {}  # size -> model field values
    size_presets: dict[str, dict[str, dict]] = {}  # size -> {section: {field: value}} for every recipe
    recipe_presets: dict[str, dict[str, dict[str, dict]]] = {}  # recipe -> {"*" | size: {section: {...}}}
    from_corpus: frozenset[str] = frozenset()  # model fields set from the corpus, never from flags

    # ---------------------------------------------------------------- config
    def validate(self, cfg) -> None:
        """Start-up checks of the model/data/recipe fields this modality reads (UsageError)."""

    def encoder_config(self, cfg, corpus):
        """The run's encoder config (``cfg.model``, completed from the corpus where needed)."""
        return cfg.model

    def encoder_config_from_dict(self, d: dict):
        return self.model_config_class(**d)

    # ---------------------------------------------------------------- models
    def build_encoder(self, enc_cfg) -> nn.Module:
        raise NotImplementedError

    def build_student(self, enc_cfg, recipe_cfg):
        raise NotImplementedError

    def teacher_encoder_weights(self, student_encoder: dict[str, torch.Tensor],
                                teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole encoder's weights (encoder names) with the teacher's averaged weights in
        place of the student's: the student's encoder state dict and the teacher's (its own names)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- data
    def open_corpus(self, cfg, *, rank: int = 0):
        raise NotImplementedError

    def corpus_path(self, corpus) -> Path:
        return Path(corpus.path)

    def corpus_fingerprint(self, corpus) -> str:
        raise NotImplementedError

    def verify_corpus(self, corpus) -> None:
        """The full content check (run in a thread during training or before it); UsageError."""

    def prepare_run_dir(self, corpus, out: Path) -> None:
        """Copy into a new run directory what export needs besides the weights (e.g. a tokenizer)."""

    def resolved_config(self, cfg, corpus) -> dict:
        """The run's config as written to ``RUN/config.json``."""
        return cfg.to_dict()

    def describe(self, cfg, corpus) -> str:
        """One clause for the start-up line: the corpus and the per-step input."""
        return f"corpus {self.corpus_path(corpus)}"

    def loader(self, corpus, cfg, *, micro_batch_size: int, epoch: int, start: int, rank: int,
               world_size: int):
        """A DataLoader of micro-batch dicts for this rank; ``len(loader.sampler)`` is the
        rank's samples in the epoch. Every batch has ``mask`` ([R, T] bool) and
        ``padding_mask`` ([B, T] bool, or None when nothing is padded)."""
        raise NotImplementedError

    def units(self, mb: dict) -> int:
        """Input units (``self.unit``) in one micro-batch, for throughput."""
        raise NotImplementedError

    def flops_per_unit(self, cfg) -> float:
        """Model FLOPs of one training step per input unit (docs/design.md#flops)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- Hugging Face
    def read_hf(self, path, *, flag: str = "--init-from") -> tuple[dict, dict[str, torch.Tensor]]:
        """(Hugging Face config, encoder weights under our names) of a local model directory."""
        raise UsageError(f"{flag} {path}: warm starts are not available for the {self.name} modality")

    def check_hf_fits(self, hf_config: dict, enc_cfg, path, *, flag: str = "--init-from") -> None:
        pass

    def export_hf(self, weights: dict[str, torch.Tensor], enc_cfg_dict: dict, out_dir: Path, *, dtype: str,
                  run_dir: Path, state: dict) -> str:
        """Write a Hugging Face model directory (atomically); returns the class name that loads it."""
        raise UsageError(f"export: not available for the {self.name} modality")

    # ---------------------------------------------------------------- probe
    has_probe: bool = False
