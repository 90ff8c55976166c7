"""What every modality's loader shares: the resumable distributed sampler (a rank's share of a
(seed, epoch) permutation, one global batch at a time; its position is a global sample count,
so a run resumes exactly, also at another world size) and the DataLoader around a modality's
dataset and collator (masks are drawn in its workers); see docs/data.md."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import UsageError


class BlockSampler(Sampler):
    """This rank's share of a (seed, epoch) permutation, one global batch at a time.

    ``start`` is the number of samples (all ranks together) already consumed in the epoch;
    it must be a multiple of ``global_batch_size``. The tail of the permutation that does
    not fill a global batch is left out, so every rank runs the same number of steps.
    """

    def __init__(self, num_blocks: int, *, global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, start: int = 0, shuffle: bool = True):
        if global_batch_size % world_size:
            raise UsageError(f"--batch-size {global_batch_size}: not divisible by the world size "
                             f"{world_size}; use a multiple of {world_size}")
        if num_blocks < global_batch_size:
            raise UsageError(f"the corpus has {num_blocks} blocks, fewer than one batch of "
                             f"{global_batch_size}; lower --batch-size or --seq-len, or use more data")
        self.num_blocks, self.global_batch_size = num_blocks, global_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.set_epoch(epoch, start)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_blocks // self.global_batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start % self.global_batch_size or not 0 <= start <= self.steps_per_epoch * self.global_batch_size:
            raise ValueError(f"start {start} must be a multiple of the global batch "
                             f"{self.global_batch_size} within the epoch")
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_blocks)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(self.num_blocks, generator=g)

    def __len__(self) -> int:
        return (self.steps_per_epoch * self.global_batch_size - self.start) // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order()
        local = self.global_batch_size // self.world_size
        for pos in range(self.start, self.steps_per_epoch * self.global_batch_size, self.global_batch_size):
            lo = pos + self.rank * local
            for i in order[lo:lo + local].tolist():
                yield (self.epoch, i)


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group: workers leave the stop to the trainer (which
    # finishes its step and checkpoints) and exit with it, instead of dying mid-batch.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def rank_loader(dataset, sampler, collate, *, micro_batch_size: int, global_batch_size: int, world_size: int,
                seed: int, num_workers: int, pin_memory: bool | None) -> DataLoader:
    """The DataLoader of every modality: this rank's ``sampler`` (which sets the order), micro-
    batches of ``micro_batch_size`` made by ``collate`` in ``num_workers`` workers (masks there)."""
    local = global_batch_size // max(world_size, 1)
    if micro_batch_size < 1 or local % micro_batch_size:
        raise UsageError(f"micro batch {micro_batch_size}: must divide the per-rank batch {local} "
                         f"(--batch-size {global_batch_size} over {world_size} rank(s))")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # Its own generator: starting an iterator must not draw from the global RNG, or a resumed
    # run's dropout would differ from the uninterrupted run's.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=False, generator=generator,
                      worker_init_fn=_worker_init if num_workers > 0 else None,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)


def batch_epoch(items: list[dict]) -> int:
    """The one epoch a micro-batch's items come from (their masks and crops are keyed by it)."""
    epochs = {it["epoch"] for it in items}
    if len(epochs) != 1:
        raise RuntimeError(f"a batch mixes epochs {sorted(epochs)}")
    return epochs.pop()
