"""Photos stored whole: preparation keeps the aspect ratio, the loader's random crop comes from
the whole photo (not its central square), batches of photos of different sizes augment to
fixed-size tensors exactly as each photo alone, the probe's centre view is deterministic, and
a corpus of the old (centre-cropped) format is refused with the command that re-prepares it."""
import json

import numpy as np
import pytest
import torch

from d2v_fast.data.images.augment import AugmentConfig, augment_batch, centre_params, draw_params
from d2v_fast.data.images.corpus import open_images, pad_stack
from d2v_fast.data.images.dataset import ImageMaskingConfig, build_image_dataloader
from d2v_fast.data.images.prepare import prepare_images
from d2v_fast.errors import UsageError
from d2v_fast.modalities.images import whole_photos

Image = pytest.importorskip("PIL.Image")

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
PLAIN = dict(color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))


def thirds(w, h):
    """A w x h photo: left third red, middle third green, right third blue (landscape), or
    top/middle/bottom thirds (portrait)."""
    a = np.zeros((h, w, 3), np.uint8)
    if w >= h:
        a[:, : w // 3], a[:, w // 3: 2 * w // 3], a[:, 2 * w // 3:] = RED, GREEN, BLUE
    else:
        a[: h // 3], a[h // 3: 2 * h // 3], a[2 * h // 3:] = RED, GREEN, BLUE
    return a


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Photos of several shapes, prepared at --size 32: 300x150 and 150x300 keep their
    aspect (32x64, 64x32), 96x32 (three squares: red | green | blue) is already at size."""
    src = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    Image.fromarray(thirds(300, 150)).save(src / "a-wide.png")
    Image.fromarray(thirds(150, 300)).save(src / "b-tall.png")
    Image.fromarray(thirds(96, 32)).save(src / "c-thirds.png")
    for k in range(13):
        w, h = (int(v) for v in rng.integers(20, 90, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / f"d{k:02d}.png")
    out = tmp_path_factory.mktemp("c") / "corpus"
    return open_images(prepare_images(out, [str(src)], size=32, workers=1, progress=False))


def test_a_non_square_photo_is_stored_whole(corpus):
    assert corpus.meta["version"] == 2 and corpus.short_side == 32
    wide, tall, sq = corpus.image(0), corpus.image(1), corpus.image(2)
    assert wide.shape == (32, 64, 3) and tall.shape == (64, 32, 3) and sq.shape == (32, 96, 3)
    assert corpus.shapes[:3].tolist() == [[32, 64], [64, 32], [32, 96]]
    assert (corpus.shapes.min(1) == 32).all()  # every photo's shorter side is --size
    # the whole width survived: red at the left edge, blue at the right, not only the centre's green
    assert (wide[:, 0] == RED).all() and (wide[:, -1] == BLUE).all() and (wide[:, 32] == GREEN).all()
    assert (tall[0] == RED).all() and (tall[-1] == BLUE).all()


def test_random_crops_come_from_outside_the_central_square(corpus):
    """Photo 2 is red | green | blue squares: its central square is all green, so a crop with
    pure red or blue pixels can only come from the rest of the photo."""
    aug = AugmentConfig(size=16, scale=(0.08, 1.0), **PLAIN)
    seen = set()
    for seed in range(40):
        p = draw_params([32], [96], aug, seed=seed, epoch=0, indices=torch.tensor([2]))
        assert p[0, 2] * p[0, 3] <= 32 * 96 and p[0, 0] + p[0, 2] <= 32 and p[0, 1] + p[0, 3] <= 96
        x = augment_batch(torch.from_numpy(corpus.image(2).copy()).permute(2, 0, 1)[None], p, aug)[0]
        px = (x.permute(1, 2, 0).reshape(-1, 3) * 255).round()
        for name, colour in (("red", RED), ("blue", BLUE)):
            if (px == torch.tensor(colour, dtype=px.dtype)).all(1).any():
                seen.add(name)
    assert seen == {"red", "blue"}, seen
    # the box's scale is relative to the whole photo's area: some boxes are larger than the
    # central square (as wide as the photo is high, at most 4/3 of that: torchvision's ratio)
    p = draw_params([32] * 400, [96] * 400, aug, seed=0, epoch=0, indices=torch.arange(400))
    assert (p[:, 3] > 32).any() and (p[:, 2] * p[:, 3]).max() > 32 * 32 and (p[:, 3] <= 43).all()


def test_a_canvas_of_mixed_sizes_augments_each_photo_as_alone():
    """A batch pads its photos into one canvas: the crop, flip, bicubic edges and the jitter's
    contrast (the mean over the photo, not the canvas) give what the photo alone gives."""
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 40), (36, 18), (24, 24))]
    cfg = AugmentConfig(size=16, color_jitter=0.4)
    sizes = [p.shape[:2] for p in photos]
    params = draw_params([s[0] for s in sizes], [s[1] for s in sizes], cfg, seed=3, epoch=1,
                         indices=torch.arange(3))
    canvas, got = pad_stack(photos, channels_first=True)
    assert canvas.shape == (3, 3, 36, 40) and got.tolist() == [list(s) for s in sizes]
    together = augment_batch(torch.from_numpy(canvas), params, cfg)
    assert together.shape == (3, 3, 16, 16)
    for i, photo in enumerate(photos):
        alone = augment_batch(torch.from_numpy(photo).permute(2, 0, 1)[None], params[i:i + 1], cfg)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-5)


def test_the_centre_view_is_deterministic_and_the_centre_square(corpus):
    one = whole_photos(corpus, [0, 1, 5], 32)
    assert one.shape == (3, 3, 32, 32)
    assert torch.equal(one, whole_photos(corpus, [0, 1, 5], 32))
    torch.testing.assert_close(whole_photos(corpus, [1], 32), one[1:2], rtol=0, atol=1e-6)  # whatever the batch
    # at the stored size: exactly the centre square (photo 2: the green one)
    centre = whole_photos(corpus, [2], 32)[0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    centre += torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    torch.testing.assert_close(centre, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 32, 32), rtol=0,
                               atol=1e-5)
    assert centre_params([(32, 96), (64, 32)])[:, :4].tolist() == [[0, 32, 32, 32], [16, 0, 32, 32]]


@pytest.mark.parametrize("in_worker", [True, False])
def test_the_loader_gives_fixed_size_batches_and_resumes_exactly(corpus, in_worker):
    kw = dict(grid=(4, 4), micro_batch_size=4, global_batch_size=8, num_workers=0, seed=7,
              masking=ImageMaskingConfig(num_masked=6, min_block=2), augment=AugmentConfig(size=16),
              augment_in_worker=in_worker)
    full = [b for _, b in zip(range(4), build_image_dataloader(corpus, **kw))]
    resumed = [b for _, b in zip(range(2), build_image_dataloader(corpus, start=8, **kw))]
    for b in full:
        x = b["pixels"] if in_worker else augment_batch(b["pixels"], b["augment"], b["augment_cfg"])
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
        assert b["augment"].shape == (4, 11)
        assert b["augment"][:, 9:].tolist() == corpus.shapes[b["indices"].numpy()].tolist()
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["pixels"], b["pixels"])
        assert torch.equal(a["augment"], b["augment"]) and torch.equal(a["mask"], b["mask"])


def test_a_corpus_of_the_old_format_is_refused_with_the_fix(corpus, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(corpus.path, old)
    meta = json.loads((old / "meta.json").read_text())
    meta["version"] = 1
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError) as err:
        open_images(old)
    msg = str(err.value)
    assert "\n" not in msg and str(old / "meta.json") in msg and "version 1" in msg
    assert "python -m d2v_fast.data.images.prepare" in msg and "--force" in msg and "whole" in msg
