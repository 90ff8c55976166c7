"""Image augmentation (parameters per (seed, epoch, index), pixels per batch) and the image loader."""
import math

import numpy as np
import torch

from d2v_fast.data.images.augment import (
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    HEIGHT,
    JITTER_ORDERS,
    LEFT,
    ORDER,
    SATURATION,
    TOP,
    WIDTH,
    AugmentConfig,
    augment_batch,
    draw_params,
)
from d2v_fast.data.images.corpus import open_images
from d2v_fast.data.images.dataset import ImageMaskingConfig, build_image_dataloader
from d2v_fast.data.images.prepare import write_image_corpus

PLAIN = AugmentConfig(size=16, color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))


def image_batch(b=2, c=3, h=16, w=16, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def params(rows):
    return torch.tensor([r + [1.0, 1.0, 1.0, 0.0] for r in rows], dtype=torch.float64)


def test_full_crop_is_the_identity_and_flip_mirrors():
    x = image_batch()
    out = augment_batch(x, params([[0, 0, 16, 16, 0], [0, 0, 16, 16, 1]]), PLAIN)
    ref = x.float() / 255
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1].flip(-1), rtol=0, atol=1e-5)


def test_crop_box_lands_where_it_says():
    x = image_batch(h=32, w=24)
    out = augment_batch(x, params([[8, 4, 16, 16, 0], [16, 8, 16, 16, 0]]), PLAIN)
    ref = x.float() / 255
    torch.testing.assert_close(out[0], ref[0, :, 8:24, 4:20], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1, :, 16:32, 8:24], rtol=0, atol=1e-5)


def test_grey_becomes_rgb_and_normalisation_and_jitter_apply():
    x = image_batch(c=1)
    cfg = AugmentConfig(size=16, color_jitter=0.4)
    p = params([[0, 0, 16, 16, 0], [0, 0, 16, 16, 0]])
    out = augment_batch(x, p, cfg)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    rgb = out * std + mean
    torch.testing.assert_close(rgb[:, 0], rgb[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(rgb[0, 0], x[0, 0].float() / 255, rtol=0, atol=1e-5)
    p[1, BRIGHTNESS] = 0.5  # darker, nothing else
    darker = augment_batch(x, p, cfg) * std + mean
    torch.testing.assert_close(darker[1], rgb[1] * 0.5, rtol=0, atol=1e-5)


def test_params_are_keyed_by_seed_epoch_index_and_follow_the_ranges():
    cfg = AugmentConfig()
    idx = torch.arange(2000)
    p = draw_params(256, 256, cfg, seed=3, epoch=1, indices=idx)
    again = draw_params(256, 256, cfg, seed=3, epoch=1, indices=idx[[7, 3]])
    assert torch.equal(again, p[[7, 3]])
    assert not torch.equal(draw_params(256, 256, cfg, seed=3, epoch=2, indices=idx[:8]), p[:8])
    h, w = p[:, HEIGHT], p[:, WIDTH]
    assert (p[:, TOP] >= 0).all() and (p[:, TOP] + h <= 256).all() and (p[:, LEFT] + w <= 256).all()
    area = h * w / 256**2
    assert area.min() > 0.07 and area.max() <= 1.0 and 0.3 < area.mean() < 0.7
    assert ((w / h).log().abs() <= math.log(4 / 3) + 0.02).all()
    assert 0.45 < p[:, FLIP].mean() < 0.55
    assert p[:, BRIGHTNESS:ORDER].min() >= 0.6 and p[:, BRIGHTNESS:ORDER].max() <= 1.4
    counts = torch.bincount(p[:, ORDER].long(), minlength=len(JITTER_ORDERS))
    assert len(counts) == 6 and counts.min() > 250  # every order of the three operations, about equally


def _jitter_by_hand(img: torch.Tensor, b: float, c: float, s: float, order) -> torch.Tensor:
    """torchvision's adjust_brightness / adjust_contrast / adjust_saturation on float [3, H, W]."""
    grey = lambda y: 0.299 * y[0:1] + 0.587 * y[1:2] + 0.114 * y[2:3]
    ops = [lambda y: (y * b).clamp(0, 1), lambda y: ((y - grey(y).mean()) * c + grey(y).mean()).clamp(0, 1),
           lambda y: ((y - grey(y)) * s + grey(y)).clamp(0, 1)]
    for i in order:
        img = ops[i](img)
    return img


def test_colour_jitter_runs_on_the_whole_image_before_the_crop_in_each_images_order():
    """beit/datasets.py: ColorJitter(0.4, 0.4, 0.4) (its operations in a random order) on the
    whole image, then the flip and RandomResizedCrop: the contrast pivots on the whole image's
    mean, not the crop's."""
    x = image_batch(b=6, h=32, w=24, seed=3)
    x[:, :, :16] //= 4  # a dark top half: the crop's mean differs from the image's
    cfg = AugmentConfig(size=16, color_jitter=0.4, mean=(0, 0, 0), std=(1, 1, 1))
    p = params([[16, 4, 16, 16, 0]] * 6)
    p[:, BRIGHTNESS], p[:, CONTRAST], p[:, SATURATION] = 1.3, 0.6, 1.4
    p[:, ORDER] = torch.arange(6, dtype=torch.float64)
    out = augment_batch(x, p, cfg)
    results = []
    for i in range(6):
        whole = _jitter_by_hand(x[i].float() / 255, 1.3, 0.6, 1.4, JITTER_ORDERS[i])
        torch.testing.assert_close(out[i], whole[:, 16:32, 4:20], rtol=0, atol=1e-5)
        results.append(out[i])
    assert len({tuple(r.flatten()[:50].tolist()) for r in results}) == 6  # the order matters
    cropped_first = _jitter_by_hand(x[0, :, 16:32, 4:20].float() / 255, 1.3, 0.6, 1.4, JITTER_ORDERS[0])
    assert not torch.allclose(out[0], cropped_first, atol=1e-3)


def test_image_loader_batches(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 1), dtype=np.uint8)
    out = write_image_corpus(tmp_path / "c", iter(images), names=[str(i) for i in range(40)],
                             labels=[i % 4 for i in range(40)],
                             short_side=32, channels=1, classes=list("abcd"), source={"test": 1}, progress=False)
    corpus = open_images(out)
    kw = dict(grid=(8, 8), micro_batch_size=8, global_batch_size=16, num_workers=0, seed=5,
              augment=AugmentConfig(size=32))
    v1 = next(iter(build_image_dataloader(corpus, masking=ImageMaskingConfig(num_masked=38, min_block=4), **kw)))
    assert v1["pixels"].shape == (8, 1, 32, 32) and v1["pixels"].dtype == torch.uint8
    assert v1["mask"].shape == (8, 64) and v1["augment"].shape == (8, 11)
    assert torch.equal(v1["pixels"][:, 0], torch.from_numpy(images[v1["indices"].numpy(), :, :, 0]))
    assert torch.equal(v1["labels"], v1["indices"] % 4)
    v2 = next(iter(build_image_dataloader(corpus, masking=ImageMaskingConfig(kind="inverse_block", clones=4), **kw)))
    assert torch.equal(v2["indices"], v1["indices"])  # same sampler order
    assert v2["mask"].shape == (32, 64) and set(v2["mask"].sum(1).tolist()) == {64 - int(64 * (1 - 0.8))}
    rank1 = next(iter(build_image_dataloader(corpus, masking=ImageMaskingConfig(num_masked=38, min_block=4),
                                             rank=1, world_size=2, **kw)))
    assert not set(rank1["indices"].tolist()) & set(v1["indices"].tolist())
