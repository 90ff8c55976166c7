"""Masking: span_mask / random_mask (C++ path and pure-Python fallback) against the
algorithm in d2v_fast/data/text/masking.py and the NumPy reference in d2v_fast/reference."""
import importlib
import math
import os
import sys
import warnings

import pytest
import torch

from d2v_fast import extension
from d2v_fast.data.text import masking
from d2v_fast.reference import masking as reference

NO_EXT = os.environ.get("D2V_FAST_NO_EXT", "0") == "1"
needs_ext = pytest.mark.skipif(NO_EXT, reason="D2V_FAST_NO_EXT=1 forces the pure-Python fallback")


def text_maskable(B, T, generator, pad_rows=0):
    """<s> ... </s> rows: first and last positions unmaskable; the first pad_rows rows end
    in a padded tail of random length (also unmaskable)."""
    maskable = torch.ones(B, T, dtype=torch.bool)
    maskable[:, 0] = False
    maskable[:, -1] = False
    for b in range(pad_rows):
        length = int(torch.randint(2, T + 1, (1,), generator=generator))
        maskable[b, length - 1 :] = False
    return maskable


def random_maskable(B, T, generator, p=0.8):
    """Random holes, random padded tails, one row with nothing maskable and one with a
    single maskable position (when B allows)."""
    maskable = torch.rand(B, T, generator=generator) < p
    lengths = torch.randint(0, T + 1, (B,), generator=generator)
    maskable &= torch.arange(T)[None, :] < lengths[:, None]
    if B >= 1:
        maskable[0] = False
    if B >= 2:
        maskable[1] = False
        maskable[1, int(torch.randint(0, T, (1,), generator=generator))] = True
    return maskable


def random_indices(B, generator):
    return torch.randperm(10 * B + 7, generator=generator)[:B]


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


# ---------------------------------------------------------------------------------------
# The extension
# ---------------------------------------------------------------------------------------


@needs_ext
def test_extension_imports_and_is_used():
    import d2v_fast._C as ext

    assert hasattr(ext, "span_mask") and hasattr(ext, "random_mask")
    assert masking._C is ext


# ---------------------------------------------------------------------------------------
# span_mask
# ---------------------------------------------------------------------------------------


def _runs(flags):
    """(start, length) of each run of True in a list of bools."""
    runs, start = [], None
    for k, f in enumerate(flags + [False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            runs.append((start, k - start))
            start = None
    return runs


def test_span_mask_fraction_and_span_structure(gen):
    B, T, p, span = 256, 512, 0.35, 4
    maskable = text_maskable(B, T, gen)
    mask = masking.span_mask(maskable, mask_prob=p, span=span, seed=int(torch.randint(0, 2**31, (1,), generator=gen)), epoch=3,
                             indices=random_indices(B, gen))
    assert mask.shape == (B, T) and mask.dtype == torch.bool
    fraction = (mask.sum(1).double() / maskable.sum(1).double()).mean().item()
    assert 0.28 <= fraction <= 0.34, fraction

    for b in range(B):
        compact = mask[b][maskable[b]].tolist()  # masks of the maskable positions, in order
        L = len(compact)
        x = p * L / span
        allowed = {min(math.floor(x), L), min(math.floor(x) + 1, L)}
        # A run not touching the row end holds only whole spans: length >= span, its first
        # position is a start, and starts lie in [first, last - span + 1]. A run at the end
        # may hold clipped spans: any of its positions can be a start.
        min_starts = max_starts = 0
        for start, length in _runs(compact):
            if start + length < L:
                assert length >= span, f"row {b}: run of {length} < span {span} before the row end"
                min_starts += math.ceil(length / span)
                max_starts += length - span + 1
            else:
                min_starts += math.ceil(length / span)
                max_starts += length
        assert any(min_starts <= n <= max_starts for n in allowed), (b, min_starts, max_starts, allowed)


def test_span_mask_full_coverage_and_zero():
    maskable = torch.rand(7, 33) < 0.6
    indices = torch.arange(7)
    full = masking.span_mask(maskable, mask_prob=1.0, span=1, seed=0, epoch=0, indices=indices)
    assert torch.equal(full, maskable)  # n = floor(L + u) = L starts of span 1: everything
    none = masking.span_mask(maskable, mask_prob=0.0, span=4, seed=0, epoch=0, indices=indices)
    assert not none.any()


@pytest.mark.parametrize("fn", ["span_mask", "random_mask"])
def test_never_masks_unmaskable(fn, gen):
    B, T = 64, 97
    maskable = random_maskable(B, T, gen)
    kwargs = dict(span=5) if fn == "span_mask" else dict(clones=3)
    clones = kwargs.get("clones", 1)
    for p in (0.35, 0.9, 1.0):
        mask = getattr(masking, fn)(maskable, mask_prob=p, seed=11, epoch=2, indices=random_indices(B, gen),
                                    **kwargs)
        allowed = maskable.repeat_interleave(clones, 0)
        assert not (mask & ~allowed).any()
        assert not mask[:clones].any()  # the row with nothing maskable


def test_span_mask_deterministic_per_sample(gen):
    B, T = 256, 512  # big enough that the C++ path splits rows over 2 threads
    maskable = text_maskable(B, T, gen, pad_rows=64)
    indices = random_indices(B, gen)
    kw = dict(mask_prob=0.35, span=4, seed=1234)
    base = masking.span_mask(maskable, epoch=5, indices=indices, **kw)
    assert torch.equal(base, masking.span_mask(maskable, epoch=5, indices=indices, **kw))

    perm = torch.randperm(B, generator=gen)
    permuted = masking.span_mask(maskable[perm], epoch=5, indices=indices[perm], **kw)
    assert torch.equal(permuted, base[perm])

    # The same samples split over two batches with different neighbours.
    first = masking.span_mask(maskable[perm[:100]], epoch=5, indices=indices[perm[:100]], **kw)
    second = masking.span_mask(maskable[perm[100:]], epoch=5, indices=indices[perm[100:]], **kw)
    assert torch.equal(torch.cat([first, second]), base[perm])

    # A non-contiguous view gives the same rows.
    strided = torch.zeros(T, B, dtype=torch.bool)
    strided.copy_(maskable.t())
    assert torch.equal(masking.span_mask(strided.t(), epoch=5, indices=indices, **kw), base)

    other_epoch = masking.span_mask(maskable, epoch=6, indices=indices, **kw)
    other_seed = masking.span_mask(maskable, epoch=5, indices=indices, **{**kw, "seed": 1235})
    for other in (other_epoch, other_seed):
        differing_rows = (other != base).any(1).float().mean().item()
        assert differing_rows > 0.9, differing_rows


@pytest.mark.parametrize("fn", ["span_mask", "random_mask"])
def test_independent_of_thread_count(fn, gen):
    B, T = 256, 512
    maskable = text_maskable(B, T, gen, pad_rows=32)
    indices = random_indices(B, gen)
    kwargs = dict(span=4, mask_prob=0.35) if fn == "span_mask" else dict(clones=8, mask_prob=0.48)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = getattr(masking, fn)(maskable, seed=9, epoch=1, indices=indices, **kwargs)
        torch.set_num_threads(2)
        two = getattr(masking, fn)(maskable, seed=9, epoch=1, indices=indices, **kwargs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


# ---------------------------------------------------------------------------------------
# random_mask
# ---------------------------------------------------------------------------------------


def test_random_mask_counts_shape_and_clones(gen):
    B, T, clones, p = 32, 256, 8, 0.48
    maskable = random_maskable(B, T, gen, p=0.9)
    indices = random_indices(B, gen)
    mask = masking.random_mask(maskable, mask_prob=p, seed=3, epoch=0, indices=indices, clones=clones)
    assert mask.shape == (B * clones, T) and mask.dtype == torch.bool

    L = maskable.sum(1)
    expected = torch.tensor([int(l * p) for l in L.tolist()]).repeat_interleave(clones)
    assert torch.equal(mask.sum(1), expected)
    assert not (mask & ~maskable.repeat_interleave(clones, 0)).any()

    per_sample = mask.view(B, clones, T)
    for b in range(B):
        if int(expected[b * clones]) >= 8:  # enough choices that clones must differ
            distinct = {per_sample[b, c].numpy().tobytes() for c in range(clones)}
            assert len(distinct) == clones, b
        # Clones adjacent: sample b alone gives exactly rows b*clones .. b*clones + clones-1.
        if b < 4:
            alone = masking.random_mask(maskable[b : b + 1], mask_prob=p, seed=3, epoch=0,
                                        indices=indices[b : b + 1], clones=clones)
            assert torch.equal(alone, per_sample[b])
    # Clone c is the same mask whatever the number of clones.
    single = masking.random_mask(maskable, mask_prob=p, seed=3, epoch=0, indices=indices, clones=1)
    assert torch.equal(single, per_sample[:, 0])
    # Another epoch, other masks.
    other = masking.random_mask(maskable, mask_prob=p, seed=3, epoch=1, indices=indices, clones=clones)
    assert (other != mask).any(1).float().mean().item() > 0.8


# ---------------------------------------------------------------------------------------
# C++ path == pure-Python fallback, bit for bit; C++ ~ NumPy reference in distribution
# ---------------------------------------------------------------------------------------

SHAPES = [(1, 1), (1, 7), (3, 1), (2, 5), (5, 64), (40, 301)]


@needs_ext
@pytest.mark.parametrize("B,T", SHAPES)
def test_cpp_matches_python_fallback(B, T, gen, monkeypatch):
    maskable = random_maskable(B, T, gen)
    indices = random_indices(B, gen)
    indices[0] = -5  # negative and huge values go through the uint64 conversion the same way
    cases = [
        ("span_mask", dict(mask_prob=0.35, span=4, seed=0, epoch=0)),
        ("span_mask", dict(mask_prob=0.9, span=1, seed=-1, epoch=2**64 - 1)),
        ("span_mask", dict(mask_prob=1.0, span=T + 3, seed=2**70 + 5, epoch=7)),
        ("random_mask", dict(mask_prob=0.48, clones=3, seed=42, epoch=1)),
        ("random_mask", dict(mask_prob=1.0, clones=1, seed=-(2**40), epoch=0)),
    ]
    cpp = [getattr(masking, fn)(maskable, indices=indices, **kw) for fn, kw in cases]
    monkeypatch.setattr(masking, "_C", None)
    for (fn, kw), expected in zip(cases, cpp):
        got = getattr(masking, fn)(maskable, indices=indices, **kw)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), (fn, kw)


def test_python_fallback_big_row_matches_cpp(gen, monkeypatch):
    """One full-size batch through both paths (the fallback alone when NO_EXT)."""
    B, T = 16, 512
    maskable = text_maskable(B, T, gen, pad_rows=4)
    indices = random_indices(B, gen)
    kw = dict(mask_prob=0.35, span=4, seed=5, epoch=0, indices=indices)
    first = masking.span_mask(maskable, **kw)
    monkeypatch.setattr(masking, "_C", None)
    assert torch.equal(masking.span_mask(maskable, **kw), first)


def test_distribution_matches_numpy_reference(gen):
    B, T = 2048, 512
    maskable = text_maskable(B, T, gen, pad_rows=256)
    indices = torch.arange(B)
    kw = dict(mask_prob=0.35, span=4, seed=17, epoch=0, indices=indices)
    ours = masking.span_mask(maskable, **kw)
    ref = reference.span_mask(maskable, **kw)
    assert not (ref & ~maskable).any()
    n_maskable = maskable.sum().item()
    ours_fraction = ours.sum().item() / n_maskable
    ref_fraction = ref.sum().item() / n_maskable
    assert abs(ours_fraction - ref_fraction) < 0.01, (ours_fraction, ref_fraction)
    assert not torch.equal(ours, ref)  # different RNGs: same distribution, not the same masks

    rkw = dict(mask_prob=0.48, seed=17, epoch=0, indices=indices[:256], clones=2)
    assert torch.equal(masking.random_mask(maskable[:256], **rkw).sum(1),
                       reference.random_mask(maskable[:256], **rkw).sum(1))


# ---------------------------------------------------------------------------------------
# Validation and the fallback warning
# ---------------------------------------------------------------------------------------

GOOD = torch.ones(2, 8, dtype=torch.bool)
IDX = torch.arange(2)


@pytest.mark.parametrize(
    "fn,kwargs,name",
    [
        ("span_mask", dict(maskable=GOOD.long()), "maskable"),
        ("span_mask", dict(maskable=GOOD[0]), "maskable"),
        ("span_mask", dict(maskable=GOOD.numpy()), "maskable"),
        ("span_mask", dict(maskable=GOOD.to("meta")), r"maskable\.cpu\(\)"),
        ("span_mask", dict(indices=IDX.float()), "indices"),
        ("span_mask", dict(indices=IDX[None]), "indices"),
        ("span_mask", dict(indices=torch.arange(3)), "indices"),
        ("span_mask", dict(indices=[0, 1]), "indices"),
        ("span_mask", dict(mask_prob=-0.1), "mask_prob"),
        ("span_mask", dict(mask_prob=1.5), "mask_prob"),
        ("span_mask", dict(mask_prob=float("nan")), "mask_prob"),
        ("span_mask", dict(span=0), "span"),
        ("span_mask", dict(span=2.5), "span"),
        ("span_mask", dict(seed=1.5), "seed"),
        ("random_mask", dict(clones=0), "clones"),
        ("random_mask", dict(mask_prob=2.0), "mask_prob"),
        ("random_mask", dict(maskable=GOOD.to("meta")), r"maskable\.cpu\(\)"),
    ],
)
def test_validation_errors(fn, kwargs, name):
    args = dict(maskable=GOOD, mask_prob=0.5, seed=0, epoch=0, indices=IDX)
    args.update(span=4) if fn == "span_mask" else args.update(clones=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as err:
        getattr(masking, fn)(**args)
    assert "\n" not in str(err.value)


def test_indices_of_any_integer_dtype_are_accepted():
    kw = dict(maskable=torch.ones(3, 40, dtype=torch.bool), mask_prob=0.5, span=2, seed=1, epoch=0)
    a = masking.span_mask(indices=torch.tensor([4, 5, 6], dtype=torch.int32), **kw)
    b = masking.span_mask(indices=torch.tensor([4, 5, 6]), **kw)
    assert torch.equal(a, b)


def test_fallback_warns_once_with_reason_and_fix(monkeypatch):
    monkeypatch.delenv("D2V_FAST_NO_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "d2v_fast._C", None)  # makes the import fail
    with pytest.raises(ImportError) as import_error:
        importlib.import_module("d2v_fast._C")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.load() is None
    assert len(caught) == 1
    assert caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert str(import_error.value) in message
    assert "pip install --no-build-isolation -e ." in message

    monkeypatch.setenv("D2V_FAST_NO_EXT", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.load() is None
    assert caught == []
