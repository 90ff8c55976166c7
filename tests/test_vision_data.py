"""Image corpus preparation: folders -> shards, labels, atomicity, bad input; the built-in corpus."""
import subprocess
import sys

import numpy as np
import pytest

from d2v_fast.data.images import prepare as prep
from d2v_fast.data.images.corpus import open_images, verify_images
from d2v_fast.errors import UsageError

from .helpers import subprocess_env

Image = pytest.importorskip("PIL.Image")


def save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def halves(h, w, left=(255, 0, 0), right=(0, 0, 255)):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2:] = left, right
    return a


def run(argv, capsys):
    rc = prep.main(argv + ["--quiet"])
    return rc, capsys.readouterr().err


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_class_folders_become_labels_and_photos_are_resized_and_stored_whole(tmp_path, capsys):
    src = tmp_path / "src"
    save(src / "cat" / "a.png", halves(20, 40))  # landscape: kept whole
    save(src / "cat" / "b.png", np.full((16, 16, 3), 77, np.uint8))  # already the size: untouched
    save(src / "dog" / "c.jpg", np.full((30, 18, 3), 200, np.uint8), quality=95)
    Image.fromarray(np.full((16, 16), 128, np.uint8)).convert("P").save(src / "dog" / "d.PNG")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 90, 10  # alpha is dropped, not composited
    save(src / "emu" / "sub" / "e.png", rgba)
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "corpus"
    rc, err = run(["--input", str(src), "--out", str(out), "--size", "16", "--workers", "1"], capsys)
    assert rc == 0, err
    c = open_images(out)
    verify_images(c)
    assert c.classes == ["cat", "dog", "emu"] and c.labels.tolist() == [0, 0, 1, 1, 2]
    assert (out / "files.txt").read_text().splitlines() == ["cat/a.png", "cat/b.png", "dog/c.jpg", "dog/d.PNG",
                                                            "emu/sub/e.png"]
    assert c.short_side == 16 and c.channels == 3 and len(c) == 5
    assert c.shapes.tolist() == [[16, 32], [16, 16], [26, 16], [16, 16], [16, 16]]  # 30x18 -> 26 (truncated) x 16
    a = c.image(0).astype(int)
    # 20x40 -> 16x32, all of it: 16 red then 16 blue (one blended column each side of the edge)
    assert a.shape == (16, 32, 3) and (a[:, :15] == [255, 0, 0]).all() and (a[:, 17:] == [0, 0, 255]).all()
    assert (c.image(1) == 77).all()
    assert c.image(2).shape == (26, 16, 3) and np.abs(c.image(2).astype(int) - 200).max() <= 3  # JPEG
    assert (c.image(3) == 128).all() and (c.image(4) == [0, 90, 0]).all()
    assert not leftovers(tmp_path)
    # same inputs: a no-op; other options: refused unless --force
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert run(["--input", str(src), "--out", str(out), "--size", "16"], capsys)[0] == 0
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    rc, err = run(["--input", str(src), "--out", str(out), "--size", "8"], capsys)
    assert rc == 2 and "--force" in err
    assert run(["--input", str(src), "--out", str(out), "--size", "8", "--force"], capsys)[0] == 0
    assert open_images(out).shapes.tolist() == [[8, 16], [8, 8], [13, 8], [8, 8], [8, 8]]


def test_images_at_the_top_level_mean_no_labels(tmp_path, capsys):
    src = tmp_path / "flat"
    save(src / "x.png", np.zeros((8, 8, 3), np.uint8))
    save(src / "cls" / "y.png", np.zeros((8, 8, 3), np.uint8))
    rc, err = run(["--input", str(src), "--out", str(tmp_path / "c"), "--size", "8"], capsys)
    assert rc == 0, err
    c = open_images(tmp_path / "c")
    assert c.classes is None and c.labels.tolist() == [-1, -1]


def test_worker_processes_give_the_same_corpus(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for i in range(64):
        save(src / f"k{i % 3}" / f"{i:03d}.png", rng.integers(0, 256, (12 + i % 5, 10, 3), dtype=np.uint8))
    one = open_images(prep.prepare_images(tmp_path / "one", [str(src)], size=8, workers=1, progress=False))
    two = open_images(prep.prepare_images(tmp_path / "two", [str(src)], size=8, workers=2, progress=False))
    assert all(np.array_equal(x, y) for x, y in zip(one.batch(range(64)), two.batch(range(64))))
    assert one.meta["shards"][0]["sha256"] == two.meta["shards"][0]["sha256"]


def _truncated_jpeg(path):
    save(path, np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_png(path):
    save(path, np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _sixteen_bit_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")


def _garbage_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not really" * 10)


@pytest.mark.parametrize("make_bad,expect", [
    (_truncated_jpeg, "truncated: its header declares 64x64 pixels, the data ends before they are all decoded"),
    (_truncated_png, "truncated: its header declares 48x64 pixels, the data ends before they are all decoded"),
    (_sixteen_bit_png, "16-bit or float"),
    (_garbage_png, "not an image Pillow can read"),
])
@pytest.mark.parametrize("lenient", [False, True])
def test_bad_image_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, make_bad, expect, lenient):
    """Also when something in the process set Pillow's LOAD_TRUNCATED_IMAGES (which fills a
    truncated image's missing rows with grey)."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient)
    src = tmp_path / "src"
    for i in range(5):
        save(src / "ok" / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    bad = src / "zz" / ("bad.jpg" if make_bad is _truncated_jpeg else "bad.png")  # sorted last: 5 images written first
    make_bad(bad)
    out = tmp_path / "corpus"
    rc, err = run(["--input", str(src), "--out", str(out), "--size", "8", "--workers", "1"], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and str(bad) in err and expect in err, err
    assert not out.exists() and not leftovers(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient  # left as it was


def test_skip_bad_warns_and_keeps_the_rest(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        save(src / "ok" / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    _truncated_jpeg(src / "ok" / "1b.jpg")
    out = tmp_path / "corpus"
    rc, err = run(["--input", str(src), "--out", str(out), "--size", "8", "--workers", "1", "--skip-bad"], capsys)
    assert rc == 0, err
    assert f"warning: skipping {src / 'ok' / '1b.jpg'}: truncated: its header declares 64x64 pixels" in err
    corpus = open_images(out)
    assert len(corpus) == 3 and corpus.meta["skipped"] == 1
    assert (out / "files.txt").read_text().split() == ["ok/0.png", "ok/1.png", "ok/2.png"]
    assert [int(corpus.batch([i])[0][0, 0, 0, 0]) for i in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("setup,expect", [
    (lambda p: p.mkdir(), "no .jpg/.jpeg/.png images"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), "no .jpg/.jpeg/.png images"),
    (lambda p: None, "no such file or directory"),
])
def test_empty_or_missing_input(tmp_path, capsys, setup, expect):
    src = tmp_path / "src"
    setup(src)
    rc, err = run(["--input", str(src), "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and expect in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_command_line_exit_status(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    r = subprocess.run([sys.executable, "-m", "d2v_fast.data.images.prepare", "--input", str(src),
                        "--out", str(tmp_path / "c")], capture_output=True, text=True,
                       env=subprocess_env(tmp_path / "x"), check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no .jpg" in r.stderr, r.stderr


def test_open_rejects_truncated_and_altered_shards(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        save(src / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    out = prep.prepare_images(tmp_path / "c", [str(src)], size=8, workers=1, progress=False)
    shard = out / "images-00000.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="sha256"):
        verify_images(open_images(out))
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(UsageError, match="bytes, expected"):
        open_images(out)
    with pytest.raises(UsageError, match="not a prepared image corpus"):
        open_images(tmp_path)


def test_builtin_fashion_mnist(tmp_path, monkeypatch, capsys):
    from d2v_fast.data.images import builtin

    if not (builtin.source_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed: {builtin.INSTALL_HINT}")
    monkeypatch.setenv("D2V_FAST_CACHE", str(tmp_path))
    path = builtin.builtin_images(limit=600)
    err = capsys.readouterr().err  # what the build says: its start, a bar, its closing line
    assert "building the built-in image corpus" in err and "700/700" in err, err
    assert f"wrote {path}: 700 images of 32x32x1, 10 classes" in err, err
    c = open_images(path)
    verify_images(c)
    assert len(c) == 700 and c.short_side == 32 and c.channels == 1 and len(c.classes) == 10
    assert (c.shapes == 32).all()
    assert c.meta["splits"] == {"train": [0, 600], "t10k": [600, 700]}
    raw, labels = builtin.load_fashion_mnist()
    assert np.array_equal(c.image(3)[2:30, 2:30, 0], raw[3]) and c.image(3)[:2].max() == 0
    assert np.array_equal(c.image(600)[2:30, 2:30, 0], raw[60000])
    assert c.labels.tolist() == labels[list(range(600)) + list(range(60000, 60100))].tolist()
    assert sorted(set(c.labels.tolist())) == list(range(10))
    assert c.image(0).std() > 30  # real photos, not blank padding
    mtime = (path / "meta.json").stat().st_mtime_ns
    assert builtin.builtin_images(limit=600, progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == mtime  # cached


def test_builtin_missing_files_give_install_hint(tmp_path, monkeypatch):
    from d2v_fast.data.images import builtin

    monkeypatch.setenv("D2V_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("D2V_FAST_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        builtin.builtin_images(limit=10, progress=False)
    assert not (tmp_path / "cache" / builtin.builtin_images_path(10).name).exists()


def test_prepare_dispatches_on_modality(tmp_path, capsys):
    """``python -m d2v_fast.data.prepare --modality images`` is the image preparation: a
    class folder becomes a corpus, a truncated JPEG one line and exit 2 with nothing written."""
    from d2v_fast.data import prepare as text_prepare

    src = tmp_path / "src"
    for i in range(3):
        save(src / "cat" / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    assert text_prepare.main(["--modality", "images", "--input", str(src), "--out", str(tmp_path / "c"),
                              "--size", "8", "--workers", "1", "--quiet"]) == 0
    assert len(open_images(tmp_path / "c")) == 3
    _truncated_jpeg(src / "dog" / "bad.jpg")
    rc = text_prepare.main(["--modality=images", "--input", str(src), "--out", str(tmp_path / "d"), "--size", "8",
                            "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "truncated: its header declares 64x64 pixels" in err, err
    assert not (tmp_path / "d").exists() and not leftovers(tmp_path)
    assert text_prepare.main(["--modality", "video", "--input", str(src), "--out", str(tmp_path / "e")]) == 2
    assert "--modality 'video': expected text, audio, images" in capsys.readouterr().err
