"""Images for the loader: a map-style dataset over a prepared image corpus and the
collator that stacks the whole uint8 photos (in a canvas of the batch's largest height and
width, ``corpus.pad_stack``) and draws, per image, the patch mask and the augmentation
parameters (both keyed by (seed, epoch, index); the random crop from the whole photo). The
augmented batch is always [B, 3, size, size], whatever the photos' sizes. The pixels stay uint8 until
``augment.augment_batch`` runs on the training device, so a batch crosses PCIe at one
byte per sample value.

Sampling reuses the text ``BlockSampler`` (a (seed, epoch) permutation, global batches,
rank slices), so resume and world-size changes work the same way for images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...errors import UsageError
from ..loader import BlockSampler, batch_epoch, rank_loader
from .augment import AugmentConfig, augment_batch, draw_params
from .corpus import ImageCorpus, pad_stack
from .masking import block_mask, inverse_block_mask

MASK_KINDS = ("block", "inverse_block")


class ImageDataset(Dataset):
    """Items are requested as ``(epoch, index)`` pairs (see ``BlockSampler``). ``first`` and
    ``count`` select a contiguous range of the corpus (the built-in corpus trains on its
    train split only, so its t10k photos stay unseen for the probe); masks and crops are
    keyed by the corpus index, not the position in the range."""

    def __init__(self, corpus: ImageCorpus, first: int = 0, count: int | None = None):
        self.corpus, self.first = corpus, first
        self.count = len(corpus) - first if count is None else count
        if not (0 <= first and 0 <= self.count and first + self.count <= len(corpus)):
            raise ValueError(f"images {first}..{first + self.count}: outside the corpus of {len(corpus)}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        index = self.first + index
        # the whole photo, a copy out of the memory map, channels first: [C, h, w]
        pixels = torch.from_numpy(np.array(self.corpus.image(index))).permute(2, 0, 1)
        return {"pixels": pixels, "index": index, "epoch": epoch, "label": int(self.corpus.labels[index])}


@dataclass
class ImageMaskingConfig:
    """``block``: BEiT block masking (v1: 120 of 196, blocks >= 16, aspect 0.3-3.3).
    ``inverse_block``: data2vec 2.0 (visible 3x3 blocks, 80% masked, equal count per clone)."""

    kind: str = "block"
    num_masked: int = 120
    min_block: int = 16
    max_block: int | None = None
    min_aspect: float = 0.3
    mask_prob: float = 0.8
    block: int = 3
    mask_prob_adjust: float = 0.07
    clones: int = 1


class ImageCollator:
    """Returns ``pixels`` uint8 [B, C, H, W] (the photos in one canvas), ``augment`` float64 [B, 11] (see
    ``augment.draw_params``), ``mask`` bool [B * clones, patches], ``labels``, ``indices``
    and ``epoch``; ``padding_mask`` None (images are never padded) and ``augment_cfg`` (the
    settings the training device needs to finish the augmentation).

    ``in_worker``: run the augmentation here (CPU training: the loader workers overlap it
    with the step); ``pixels`` is then the normalised float32 [B, 3, size, size]."""

    def __init__(self, grid: tuple[int, int], masking: ImageMaskingConfig, augment: AugmentConfig, seed: int,
                 in_worker: bool = False):
        if masking.kind not in MASK_KINDS:
            raise UsageError(f"image masking kind {masking.kind!r}: expected one of {', '.join(MASK_KINDS)}")
        self.grid, self.masking, self.augment, self.seed = grid, masking, augment, seed
        self.in_worker = in_worker

    def __call__(self, items: list[dict]) -> dict:
        canvas, sizes = pad_stack([it["pixels"].permute(1, 2, 0).numpy() for it in items], channels_first=True)
        pixels = torch.from_numpy(canvas)
        indices = torch.tensor([it["index"] for it in items], dtype=torch.long)
        epoch = batch_epoch(items)
        m = self.masking
        if m.kind == "block":
            mask = block_mask(self.grid, num_masked=m.num_masked, min_block=m.min_block, max_block=m.max_block,
                              min_aspect=m.min_aspect, seed=self.seed, epoch=epoch, indices=indices)
        else:
            mask = inverse_block_mask(self.grid, mask_prob=m.mask_prob, block=m.block,
                                      mask_prob_adjust=m.mask_prob_adjust, clones=m.clones, seed=self.seed,
                                      epoch=epoch, indices=indices)
        params = draw_params(sizes[:, 0].tolist(), sizes[:, 1].tolist(), self.augment, seed=self.seed, epoch=epoch,
                             indices=indices)
        if self.in_worker:
            pixels = augment_batch(pixels, params, self.augment)
        return {"pixels": pixels, "augment": params, "augment_cfg": self.augment, "mask": mask,
                "padding_mask": None, "indices": indices, "epoch": epoch,
                "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}


def build_image_dataloader(corpus: ImageCorpus, *, grid: tuple[int, int], micro_batch_size: int,
                           global_batch_size: int, masking: ImageMaskingConfig | None = None,
                           augment: AugmentConfig | None = None, seed: int = 0, epoch: int = 0, start: int = 0,
                           rank: int = 0, world_size: int = 1, num_workers: int = 2,
                           pin_memory: bool | None = None, split: tuple[int, int] | None = None,
                           augment_in_worker: bool = False) -> DataLoader:
    """A DataLoader of masked micro-batches for this rank (as the text one). ``split``:
    (first, count) of the corpus images to sample from (default all)."""
    dataset = ImageDataset(corpus) if split is None else ImageDataset(corpus, *split)
    sampler = BlockSampler(len(dataset), global_batch_size=global_batch_size, rank=rank, world_size=world_size,
                           seed=seed, epoch=epoch, start=start)
    collate = ImageCollator(grid, masking or ImageMaskingConfig(), augment or AugmentConfig(), seed,
                            in_worker=augment_in_worker)
    return rank_loader(dataset, sampler, collate, micro_batch_size=micro_batch_size,
                       global_batch_size=global_batch_size, world_size=world_size, seed=seed,
                       num_workers=num_workers, pin_memory=pin_memory)
