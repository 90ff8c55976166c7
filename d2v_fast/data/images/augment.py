"""Image augmentation split in two: parameters drawn per image on the CPU (in the loader
workers, keyed by (seed, epoch, index) like the masks, so a resumed or re-sharded run sees
the same crops), pixels transformed for the whole batch on any device (the GPU in
training) from the stored uint8 images.

The photos are stored whole (shorter side resized at preparation, aspect kept), so a batch
is a canvas of its largest height and width with each photo at the top left, extended by
repeating its last row and column (``corpus.pad_stack``); the parameters carry each photo's
own height and width, and everything below is relative to the photo, not the canvas.

What it does: colour jitter on the whole stored image first (brightness, contrast,
saturation factors uniform in [1 - j, 1 + j], applied in a random order per image; hue
untouched, as BEiT's ``ColorJitter(0.4, 0.4, 0.4)``, which data2vec_vision ``beit/datasets.py``
runs before the flip and the crop, so the contrast pivots on the whole image's mean), then
RandomResizedCrop (area ``scale`` of the whole photo's, aspect ``ratio`` log-uniform, the box
anywhere in the photo; torchvision's 10 tries then a centre-crop fallback), horizontal flip
with p = 0.5, then mean/std normalisation. Greyscale images are repeated to RGB.

Differences from torchvision, on purpose: the crop is resampled by one bicubic
``grid_sample`` (no antialiasing when shrinking: from photos stored at shorter side 256 to
224, the largest crops, up to 256 x 341, shrink by at most 224 / 341 = 0.66; most crops are
smaller than 224 and enlarged, where antialiasing does nothing), and the jitter
works on float pixels (PIL rounds to uint8 after each of its operations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masking import _as_u64, _row_key, _RowRng

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_AUGMENT_KIND = 0x4155474D  # "AUGM": independent of the mask streams of the same image
# columns of the parameter tensor; IMAGE_HEIGHT, IMAGE_WIDTH: the photo's own size in its
# canvas (a tensor without them: every photo fills the canvas)
TOP, LEFT, HEIGHT, WIDTH, FLIP, BRIGHTNESS, CONTRAST, SATURATION, ORDER, IMAGE_HEIGHT, IMAGE_WIDTH = range(11)
# the orders the jitter's operations (0 brightness, 1 contrast, 2 saturation) can run in
JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


@dataclass
class AugmentConfig:
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)  # v1 (BEiT); 2.0: (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_jitter: float = 0.4  # v1; 2.0: 0 (none)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def draw_params(height, width, cfg: AugmentConfig, *, seed: int, epoch: int,
                indices: torch.Tensor) -> torch.Tensor:
    """float64 [B, 11]: crop (top, left, height, width) in source pixels, flip (0/1), the
    brightness, contrast and saturation factors, the jitter's order (an index into
    ``JITTER_ORDERS``), then the photo's height and width, of each image. ``height`` and
    ``width``: each photo's (sequences of B) or one for all (ints)."""
    seed, epoch = _as_u64("seed", seed), _as_u64("epoch", epoch)
    n = len(indices)
    heights = [int(height)] * n if isinstance(height, int) else [int(v) for v in height]
    widths = [int(width)] * n if isinstance(width, int) else [int(v) for v in width]
    if len(heights) != n or len(widths) != n:
        raise ValueError(f"{len(heights)} heights and {len(widths)} widths for {n} images")
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    rows = []
    for index, height, width in zip(indices.tolist(), heights, widths):
        area = height * width
        rng = _RowRng(_row_key(_AUGMENT_KIND, seed, epoch, index, 0))
        crop = None
        for _ in range(10):
            target = area * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * rng.uniform())
            aspect = math.exp(log_lo + (log_hi - log_lo) * rng.uniform())
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                crop = (rng.bounded(height - h + 1), rng.bounded(width - w + 1), h, w)
                break
        if crop is None:  # torchvision's fallback: the largest centred crop within the ratio range
            in_ratio = width / height
            if in_ratio < cfg.ratio[0]:
                w, h = width, round(width / cfg.ratio[0])
            elif in_ratio > cfg.ratio[1]:
                h, w = height, round(height * cfg.ratio[1])
            else:
                h, w = height, width
            crop = ((height - h) // 2, (width - w) // 2, h, w)
        flip = float(cfg.flip and rng.uniform() < 0.5)
        j = cfg.color_jitter
        factors = [1.0 - j + 2.0 * j * rng.uniform() for _ in range(3)]
        order = float(rng.bounded(len(JITTER_ORDERS)))
        rows.append([*crop, flip, *factors, order, height, width])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 11)


def centre_params(sizes) -> torch.Tensor:
    """The parameters (as ``draw_params``) of the deterministic centre view of photos of
    ``sizes`` ((height, width) each): their centre square, no flip or jitter. Resized to the
    image size by ``augment_batch``, this is "resize the shorter side, then centre-crop"."""
    rows = []
    for h, w in (tuple(int(v) for v in s) for s in sizes):
        side = min(h, w)
        rows.append([(h - side) // 2, (w - side) // 2, side, side, 0, 1, 1, 1, 0, h, w])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 11)


def _grey(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601 luma, as torchvision's rgb_to_grayscale
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _jitter(x: torch.Tensor, p: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Brightness, contrast and saturation of [B, 3, H, W] in [0, 1], each image in its own
    order (column ``ORDER``); the contrast pivots on the mean grey of the image given (of its
    ``valid`` pixels, a [B, 1, H, W] mask, when it does not fill the canvas)."""
    B = x.shape[0]
    f = p[:, BRIGHTNESS:SATURATION + 1].view(B, 3, 1, 1, 1)

    def mean_grey(y: torch.Tensor) -> torch.Tensor:
        g = _grey(y)
        if valid is None:
            return g.mean(dim=(1, 2, 3), keepdim=True)
        return (g * valid).sum(dim=(1, 2, 3), keepdim=True) / valid.sum(dim=(1, 2, 3), keepdim=True)

    def blend(y: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return ((y - other) * factor + other).clamp(0, 1)

    ops = (lambda y: (y * f[:, 0]).clamp(0, 1),
           lambda y: blend(y, mean_grey(y), f[:, 1]),
           lambda y: blend(y, _grey(y), f[:, 2]))
    orders = torch.tensor(JITTER_ORDERS, device=x.device)[p[:, ORDER].long()]  # [B, 3]
    for slot in range(3):
        which = orders[:, slot].view(B, 1, 1, 1)
        if bool((which == which[0]).all()):  # one operation for the whole batch
            x = ops[int(which[0])](x)
        else:
            x = torch.where(which == 0, ops[0](x), torch.where(which == 1, ops[1](x), ops[2](x)))
    return x


def augment_batch(pixels: torch.Tensor, params: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3, any device; a canvas of photos as ``corpus.pad_stack``
    makes, each photo's size in ``params``) -> normalised float32 [B, 3, size, size]."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"pixels must be uint8 [B, 1 or 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
    B, C, H, W = pixels.shape
    p = params.to(device=pixels.device, dtype=torch.float32)
    x = pixels.float().div_(255.0)
    if cfg.color_jitter > 0:  # on the whole image, before the crop
        valid = None  # no branch on the sizes' values: that would wait for the device
        if p.shape[1] > IMAGE_WIDTH:
            rows = torch.arange(H, device=x.device).view(1, 1, H, 1) < p[:, IMAGE_HEIGHT].view(B, 1, 1, 1)
            cols = torch.arange(W, device=x.device).view(1, 1, 1, W) < p[:, IMAGE_WIDTH].view(B, 1, 1, 1)
            valid = (rows & cols).float()
        x = _jitter(x.expand(B, 3, H, W), p, valid)
        C = 3
    # Affine grid in normalised coordinates (align_corners=False: -1 and 1 are the outer
    # pixel edges), mapping each output pixel centre into its crop box.
    theta = torch.zeros(B, 2, 3, device=pixels.device)
    sx, sy = p[:, WIDTH] / W, p[:, HEIGHT] / H
    theta[:, 0, 0] = torch.where(p[:, FLIP] > 0, -sx, sx)
    theta[:, 0, 2] = (2 * p[:, LEFT] + p[:, WIDTH]) / W - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * p[:, TOP] + p[:, HEIGHT]) / H - 1
    grid = F.affine_grid(theta, [B, C, cfg.size, cfg.size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)
    if C == 1:
        x = x.expand(B, 3, cfg.size, cfg.size)
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
