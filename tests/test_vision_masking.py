"""Image patch masks: C++ extension vs the Python twin (bit for bit), determinism, counts."""
import pytest
import torch

from d2v_fast.data.images import masking as im

needs_ext = pytest.mark.skipif(im._C is None, reason="d2v_fast._C without image masks: build it first")

BLOCK_CASES = [
    ((14, 14), dict(num_masked=120)),  # the published v1 setting
    ((8, 8), dict(num_masked=38, min_block=4)),  # tiny: 32 / 4
    ((6, 10), dict(num_masked=30, min_block=4, max_block=12, min_aspect=0.5)),
    ((14, 14), dict(num_masked=0)),
    ((3, 3), dict(num_masked=9, min_block=1)),  # BEiT never places a full-side block: stops early
]
INVERSE_CASES = [
    ((14, 14), dict(mask_prob=0.8, clones=4)),  # the published 2.0 setting (16 clones)
    ((8, 8), dict(mask_prob=0.8, clones=3)),
    ((6, 10), dict(mask_prob=0.5, block=2, mask_prob_adjust=0.0, clones=2)),
    ((5, 5), dict(mask_prob=0.0, clones=1)),
    ((5, 5), dict(mask_prob=1.0, block=1, clones=1)),
]


def indices(n=64):
    return torch.tensor([3, 0, 10**12, 2**63 - 1] + list(range(7, 7 + n - 4)))


@needs_ext
@pytest.mark.parametrize("grid,kw", BLOCK_CASES)
def test_block_mask_extension_equals_python(grid, kw, monkeypatch):
    ext = im.block_mask(grid, seed=5, epoch=2, indices=indices(), **kw)
    monkeypatch.setattr(im, "_C", None)
    assert torch.equal(ext, im.block_mask(grid, seed=5, epoch=2, indices=indices(), **kw))


@needs_ext
@pytest.mark.parametrize("grid,kw", INVERSE_CASES)
def test_inverse_block_mask_extension_equals_python(grid, kw, monkeypatch):
    ext = im.inverse_block_mask(grid, seed=5, epoch=2, indices=indices(), **kw)
    monkeypatch.setattr(im, "_C", None)
    assert torch.equal(ext, im.inverse_block_mask(grid, seed=5, epoch=2, indices=indices(), **kw))


def test_block_mask_published_counts_and_blocks():
    masks = im.block_mask((14, 14), seed=0, epoch=0, indices=torch.arange(512), **im.BEIT_BLOCK)
    counts = masks.sum(1)
    assert masks.shape == (512, 196) and int(counts.max()) <= 120
    assert int(counts.min()) >= 16  # at least one block of >= 16 patches
    assert 115 < float(counts.float().mean()) <= 120  # ~61% of the patches, as BEiT
    rate = masks.float().mean(0)
    # every position gets masked; BEiT's blocks never span a full side, so corners are rare (~8%)
    assert rate.min() > 0.02 and rate.view(14, 14)[5:9, 5:9].min() > 0.8
    grid = masks.view(-1, 14, 14)
    # blocks, not scattered patches: most masked patches have a masked right neighbour
    both = (grid[:, :, 1:] & grid[:, :, :-1]).sum()
    assert both / grid[:, :, :-1].sum() > 0.85


def test_inverse_block_mask_published_counts_and_visible_blocks():
    masks = im.inverse_block_mask((14, 14), seed=0, epoch=0, indices=torch.arange(64), **im.DATA2VEC2_INVERSE_BLOCK)
    assert masks.shape == (64 * 16, 196)
    assert set(masks.sum(1).tolist()) == {196 - 39}  # int(196 * 0.2) visible in every clone
    visible = ~masks.view(-1, 14, 14)
    pairs = (visible[:, :, 1:] & visible[:, :, :-1]).sum() + (visible[:, 1:] & visible[:, :-1]).sum()
    # visible patches come in 3x3 blocks: far more visible neighbour pairs than chance (~0.4 per patch)
    assert pairs / visible.sum() > 1.0
    clones = masks.view(64, 16, 196)
    assert all(len({tuple(c.tolist()) for c in sample}) == 16 for sample in clones)


@pytest.mark.parametrize("fn,kw", [(im.block_mask, dict(num_masked=38, min_block=4)),
                                    (im.inverse_block_mask, dict(mask_prob=0.8, clones=2))])
def test_rows_depend_only_on_seed_epoch_index(fn, kw):
    a = fn((8, 8), seed=1, epoch=0, indices=torch.tensor([5, 9, 11]), **kw)
    b = fn((8, 8), seed=1, epoch=0, indices=torch.tensor([11, 5]), **kw)
    rows = a.shape[0] // 3
    assert torch.equal(b[:rows], a[2 * rows:]) and torch.equal(b[rows:], a[:rows])
    assert not torch.equal(fn((8, 8), seed=1, epoch=1, indices=torch.tensor([5, 9, 11]), **kw), a)
    assert not torch.equal(fn((8, 8), seed=2, epoch=0, indices=torch.tensor([5, 9, 11]), **kw), a)


@pytest.mark.parametrize("call,match", [
    (lambda: im.block_mask((14, 14), num_masked=197, seed=0, epoch=0, indices=torch.arange(2)), "num_masked"),
    (lambda: im.block_mask((14,), num_masked=10, seed=0, epoch=0, indices=torch.arange(2)), "grid"),
    (lambda: im.block_mask((14, 14), num_masked=10, min_aspect=0, seed=0, epoch=0, indices=torch.arange(2)),
     "min_aspect"),
    (lambda: im.block_mask((14, 14), num_masked=10, seed=0, epoch=0, indices=torch.ones(2)), "indices"),
    (lambda: im.inverse_block_mask((14, 14), mask_prob=1.5, seed=0, epoch=0, indices=torch.arange(2)), "mask_prob"),
    (lambda: im.inverse_block_mask((14, 14), mask_prob=0.8, clones=0, seed=0, epoch=0, indices=torch.arange(2)),
     "clones"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
