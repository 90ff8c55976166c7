"""Batches of speech: length-bucketed, each cropped to its shortest utterance (no padding).

Order (fixed by seed and epoch): utterances sorted by length, ties broken at random, cut
into consecutive global batches of ``global_batch_size``; the global batches are then
shuffled. So every batch holds utterances of nearly the same length and cropping to the
shortest one throws little away, as in fairseq's size-sorted batching for data2vec audio.
Rank r takes the r-th contiguous slice of every global batch, like the text sampler, so a
step consumes ``global_batch_size`` utterances whatever the world size and ``start``
(utterances consumed in the epoch) resumes exactly.

The collator crops each utterance of a micro-batch to the micro-batch's shortest length
(capped at ``max_samples``) at an offset drawn from (seed, epoch, utterance index) alone,
so a batch is the same in any DataLoader worker and after a resume. Masks are the
recipe's business: pass ``make_masks(num_frames, indices, epoch) -> dict`` and its tensors
join the batch (made in the loader workers, after cropping, where the frame count is
known).
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ...errors import UsageError
from ..loader import batch_epoch
from .corpus import AudioCorpus


def bucket_order(lengths: np.ndarray, global_batch_size: int, seed: int, epoch: int,
                 shuffle: bool = True) -> np.ndarray:
    """``[steps, global_batch_size]`` utterance indices: one row per global batch, rows of
    similar lengths; the tail that does not fill a batch is left out of this epoch."""
    n = len(lengths)
    steps = n // global_batch_size
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return order[: steps * global_batch_size].reshape(steps, global_batch_size)
    rng = np.random.default_rng([seed, epoch])
    tie = rng.permutation(n)
    order = np.lexsort((tie, lengths))  # by length, ties at random
    # which utterances fall out as the tail changes with the epoch: drop a random few
    # from random places rather than always the longest
    if steps * global_batch_size < n:
        keep = np.sort(rng.choice(n, steps * global_batch_size, replace=False))
        order = order[keep]
    batches = order.reshape(steps, global_batch_size)
    return batches[rng.permutation(steps)]


class AudioBatchSampler(Sampler):
    """This rank's share of each global batch, yielding ``(epoch, index)`` like the text
    sampler. ``start`` counts utterances consumed in the epoch (a multiple of the global
    batch)."""

    def __init__(self, lengths: np.ndarray, *, global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, start: int = 0, shuffle: bool = True):
        if global_batch_size % world_size:
            raise UsageError(f"--batch-size {global_batch_size}: not divisible by the world size "
                             f"{world_size}; use a multiple of {world_size}")
        if len(lengths) < global_batch_size:
            raise UsageError(f"the speech corpus has {len(lengths)} utterances, fewer than one batch of "
                             f"{global_batch_size}; lower --batch-size or use more data")
        self.lengths, self.global_batch_size = np.asarray(lengths), global_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.set_epoch(epoch, start)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start % self.global_batch_size or not 0 <= start <= self.steps_per_epoch * self.global_batch_size:
            raise ValueError(f"start {start} must be a multiple of the global batch "
                             f"{self.global_batch_size} within the epoch")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.steps_per_epoch * self.global_batch_size - self.start) // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        batches = bucket_order(self.lengths, self.global_batch_size, self.seed, self.epoch, self.shuffle)
        local = self.global_batch_size // self.world_size
        for row in batches[self.start // self.global_batch_size:]:
            for i in row[self.rank * local:(self.rank + 1) * local].tolist():
                yield (self.epoch, i)


class UtteranceDataset(Dataset):
    """Items are ``(epoch, index)`` keys; the waveform is read by the collator, which
    knows the crop length (only the cropped window leaves the memory map)."""

    def __init__(self, corpus: AudioCorpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return {"index": int(index), "epoch": int(epoch), "length": int(self.corpus.lengths[index])}


def crop_offset(seed: int, epoch: int, index: int, slack: int) -> int:
    """Start of the crop window: uniform in [0, slack], a function of its arguments only."""
    if slack <= 0:
        return 0
    return int(np.random.default_rng([seed, epoch, index, 0x41]).integers(0, slack + 1))


class CropCollator:
    """Stacks a micro-batch cropped to its shortest utterance: ``waveform`` float32
    ``[B, S]``, ``num_frames`` (frames of the model's extractor for S samples, when
    ``frames_for`` is given), ``indices``, ``epoch`` and whatever ``make_masks`` adds."""

    def __init__(self, corpus: AudioCorpus, seed: int, max_samples: int | None = None,
                 frames_for: Callable[[int], int] | None = None,
                 make_masks: Callable[[int, torch.Tensor, int], dict] | None = None):
        self.corpus, self.seed, self.max_samples = corpus, seed, max_samples
        self.frames_for, self.make_masks = frames_for, make_masks

    def __call__(self, items: list[dict]) -> dict:
        epoch = batch_epoch(items)
        size = min(it["length"] for it in items)
        if self.max_samples is not None:
            size = min(size, self.max_samples)
        wav = np.empty((len(items), size), dtype=np.float32)
        for row, it in enumerate(items):
            off = crop_offset(self.seed, epoch, it["index"], it["length"] - size)
            wav[row] = self.corpus.window(it["index"], off, size)
        indices = torch.tensor([it["index"] for it in items], dtype=torch.long)
        batch = {"waveform": torch.from_numpy(wav), "indices": indices, "epoch": epoch}
        if self.frames_for is not None:
            batch["num_frames"] = int(self.frames_for(size))
            if self.make_masks is not None:
                batch.update(self.make_masks(batch["num_frames"], indices, epoch))
        return batch


def build_audio_dataloader(corpus: AudioCorpus, *, micro_batch_size: int, global_batch_size: int,
                           seed: int = 0, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1,
                           max_samples: int | None = None, frames_for=None, make_masks=None,
                           num_workers: int = 2, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader of cropped micro-batches for this rank (see the module docstring)."""
    from ..loader import rank_loader

    sampler = AudioBatchSampler(corpus.lengths, global_batch_size=global_batch_size, rank=rank,
                                world_size=world_size, seed=seed, epoch=epoch, start=start)
    collate = CropCollator(corpus, seed, max_samples, frames_for, make_masks)
    return rank_loader(UtteranceDataset(corpus), sampler, collate, micro_batch_size=micro_batch_size,
                       global_batch_size=global_batch_size, world_size=world_size, seed=seed,
                       num_workers=num_workers, pin_memory=pin_memory)
