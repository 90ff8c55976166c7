"""The reference recipe's optimizer update, written plainly, and a single-process loop over
it: the other half of the engine-vs-reference parity tests and the ``reference`` provider
of the step benchmark (one step, used by both)."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..config import Config
from ..data.text.corpus import Corpus
from ..data.text.dataset import build_dataloader
from .data2vec import ReferenceData2Vec
from .common import ReferenceUpdate
from .data2vec2 import ReferenceData2Vec2


class ReferenceStep:
    """The reference model with its AdamW (weight decay by ``optim.decay_biases_and_norms``,
    as the engine), warmup + cosine schedule, clipping and per-parameter EMA loop.
    Calling it runs one optimizer update over a list of micro-batches and returns the loss
    (a 0-dim tensor on the device: reading it is the caller's choice)."""

    def __init__(self, cfg: Config, vocab_size: int, pad_id: int, *, device: torch.device | str = "cpu",
                 engine_state: dict | None = None, compile: bool = False):
        t, r = cfg.train, cfg.recipe
        self.device = torch.device(device)
        torch.manual_seed(t.seed)
        enc = dataclasses.replace(cfg.model, vocab_size=vocab_size, pad_id=pad_id)
        self.v2 = r.name == "data2vec2"
        self.model = (ReferenceData2Vec2 if self.v2 else ReferenceData2Vec)(enc, r)
        if engine_state is not None:
            self.model.load_engine_state(engine_state)
        self.model.to(self.device).train()
        torch.manual_seed(t.seed + 1)  # the engine's rank-0 dropout seed
        self.update = ReferenceUpdate(self.model, cfg)
        self.forward = torch.compile(self.model) if compile else self.model
        bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def __call__(self, micro_batches: list[dict]) -> torch.Tensor:
        n = sum(int(mb["mask"].sum()) for mb in micro_batches)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            padded = mb.get("padding_mask") is not None and bool(mb["padding_mask"].any())  # on the host copy
            mb = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
            pad = mb["padding_mask"] if padded else None
            with self.autocast:
                if self.v2:
                    loss, _, _, _ = self.forward(mb["input_ids"], pad, mb["mask"])
                else:
                    loss, _, _, _ = self.forward(mb["masked_input_ids"], mb["input_ids"], pad, mb["mask"])
            (loss / n).backward()
            total += loss.detach()
        self.update()
        return total / n


def reference_losses(cfg: Config, corpus: Corpus, steps: int, engine_state: dict | None = None) -> list[float]:
    """Per-step losses of ``steps`` optimizer updates, on the batches the engine sees."""
    from ..modalities.text import masking_for  # the mask settings are shared, not under test

    t = cfg.train
    step = ReferenceStep(cfg, corpus.vocab_size, corpus.special_ids["pad"], engine_state=engine_state)
    micro = t.micro_batch_size or t.batch_size
    loader = build_dataloader(corpus, seq_len=cfg.data.seq_len, micro_batch_size=micro,
                              global_batch_size=t.batch_size, masking=masking_for(cfg.recipe),
                              block_mode=cfg.data.block_mode, seed=t.seed, num_workers=0)
    it = iter(loader)
    return [float(step([next(it) for _ in range(t.batch_size // micro)])) for _ in range(steps)]
