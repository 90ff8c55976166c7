"""Images on the core: presets, students against the eager reference, the
trainer on the built-in Fashion-MNIST photos (parity, resume, two processes), export to
``Data2VecVisionModel`` and ``--init-from``."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from d2v_fast import ops, pretrain
from d2v_fast import linear_probe, probing
from d2v_fast.config import preset
from d2v_fast.data.images import builtin
from d2v_fast.data.images.corpus import open_images
from d2v_fast.data.images.masking import block_mask, inverse_block_mask
from d2v_fast.modalities.images import (IMAGES, ImageStudent, ImageStudent2, flops_per_patch, image_probe_task,
                                        pooled_features)
from d2v_fast.reference.images import ReferenceImages, ReferenceImages2, reference_image_losses

from .helpers import losses, subprocess_env

pytestmark = pytest.mark.skipif(not (builtin.source_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason=f"Fashion-MNIST not installed: {builtin.INSTALL_HINT}")

LIMIT = 300  # built-in photos for the CLI tests: 300 train + 50 t10k
RECIPES = ["data2vec", "data2vec2"]


@pytest.fixture(scope="module")
def images_cache(tmp_path_factory):
    """A private cache holding a small built-in image corpus (the first LIMIT photos)."""
    import os

    cache = tmp_path_factory.mktemp("img_cache")
    old = os.environ.get("D2V_FAST_CACHE")
    os.environ["D2V_FAST_CACHE"] = str(cache)
    path = builtin.builtin_images(limit=LIMIT, progress=False)
    yield path
    if old is None:
        os.environ.pop("D2V_FAST_CACHE", None)
    else:
        os.environ["D2V_FAST_CACHE"] = old


def tiny(recipe, corpus_path, batch_size=8, **train):
    """The tiny image preset at a test-sized batch, dropout-free (the reference draws no
    dropout), no workers, every step logged."""
    cfg = preset("tiny", recipe, "images")
    cfg.data.path, cfg.data.num_workers = str(corpus_path), 0
    cfg.model.dropout = cfg.model.attention_dropout = cfg.model.drop_path = 0.0
    cfg.train.batch_size, cfg.train.log_every, cfg.train.progress, cfg.train.ckpt_every = batch_size, 1, False, 0
    cfg.train.device, cfg.train.probe_task = "cpu", "none"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def cli(recipe, corpus_path, *extra):
    return ["--modality", "images", "--recipe", recipe, "--config", "tiny", "--data", str(corpus_path),
            "--batch-size", "8", "--data.num_workers", "0", "--train.progress", "false", "--train.log_every", "1",
            "--train.probe_task", "none", "--model.drop_path", "0", "--model.attention_dropout", "0", *extra]


# ------------------------------------------------------------------ presets and students
def test_base_presets_carry_the_published_recipes():
    v1, v2 = preset("base", "data2vec", "images"), preset("base", "data2vec2", "images")
    assert (v1.model.image_size, v1.model.patch_size, v1.model.hidden_size, v1.model.num_layers) == (224, 16, 768, 12)
    assert v1.model.position_encoding == "relative" and v1.model.layer_scale_init == 1e-4
    assert (v1.recipe.top_k, v1.recipe.layer_norm, v1.recipe.final_norm, v1.recipe.loss_beta) == (6, "layer", "layer", 2.0)
    assert v1.recipe.loss_scale == 1 / 768 and v1.recipe.ema_decay == v1.recipe.ema_end_decay == 0.9998
    assert (v1.recipe.mask_patches, v1.recipe.mask_min_block, v1.optim.lr, v1.optim.clip_norm) == (120, 16, 2e-3, 3.0)
    assert v1.train.batch_size == 2048 and v1.optim.warmup_steps == 6250 and v1.optim.total_steps == 500_000
    assert v2.model.position_encoding == "sincos" and v2.model.layer_scale_init == 0 and not v2.model.use_mask_token
    assert (v2.recipe.top_k, v2.recipe.layer_norm, v2.recipe.final_norm, v2.recipe.clones) == (10, "instance", "layer", 16)
    assert (v2.recipe.mask_prob, v2.recipe.mask_span, v2.recipe.decoder_layers, v2.recipe.decoder_kernel) == (0.8, 3, 6, 3)
    assert v2.optim.betas == (0.9, 0.95) and v2.optim.lr == 1e-3 and v2.optim.clip_norm == 4.0
    assert v2.recipe.cls_loss_weight == pytest.approx(2.56) and v2.data.crop_scale == (0.2, 1.0)
    assert v2.data.color_jitter == 0 and v1.data.color_jitter == 0.4 and v1.data.crop_scale == (0.08, 1.0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_student_step_equals_reference(recipe):
    """One loss and its gradient: the engine's student/targets/loss against the plain reference."""
    cfg = preset("tiny", recipe, "images")
    cfg.model.drop_path = cfg.model.attention_dropout = 0.0
    r = cfg.recipe
    torch.manual_seed(0)
    student = IMAGES.build_student(cfg.model, r).train()
    assert isinstance(student, ImageStudent2 if recipe == "data2vec2" else ImageStudent)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # off the zero/one initialisations
    teacher = copy.deepcopy(student.ema_source()).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    idx = torch.arange(4)
    if recipe == "data2vec":
        mask = block_mask((8, 8), num_masked=r.mask_patches, min_block=r.mask_min_block, seed=0, epoch=0, indices=idx)
    else:
        mask = inverse_block_mask((8, 8), mask_prob=r.mask_prob, block=r.mask_span, mask_prob_adjust=r.mask_prob_adjust,
                                  clones=r.clones, seed=0, epoch=0, indices=idx)
    pixels = torch.randn(4, 3, 32, 32)
    batch = {"pixels": pixels, "mask": mask, "padding_mask": None}
    torch.manual_seed(5)
    pred, ti = student(batch)
    layers = student.teacher_layers(teacher, batch, ti)
    target = ops.build_targets(layers[-r.top_k:], mask=mask, layer_norm=r.norm(r.layer_norm),
                               final_norm=r.norm(r.final_norm))
    loss = ops.regression_loss(pred, target, beta=r.loss_beta, scale=r.loss_scale if r.loss_scale > 0 else None)
    extra = student.extra_loss(batch)
    assert (extra is None) == (recipe == "data2vec")
    loss = loss + (extra if extra is not None else 0)
    loss.backward()
    ref = (ReferenceImages2 if recipe == "data2vec2" else ReferenceImages)(cfg.model, r)
    state = {"student." + k: v for k, v in student.state_dict().items()}
    state.update({"teacher." + k: v for k, v in teacher.state_dict().items()})
    ref.load_engine_state(state)
    torch.manual_seed(5)  # the same mask noise
    ref_loss, count = ref(pixels, mask)
    ref_loss.backward()
    assert int(count) == int(mask.sum()) == pred.shape[0]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for (name, a), b in zip(student.encoder.named_parameters(), ref.encoder.parameters()):
        err = float((a.grad - b.grad).abs().max()) / max(float(b.grad.abs().max()), 1e-12)
        assert err <= 1e-4, f"{name}: gradient differs by {err:.2e} of its largest entry"


def test_flops_per_patch_counts_the_recipes():
    v1, v2 = preset("base", "data2vec", "images"), preset("base", "data2vec2", "images")
    n = 12 * (4 * 768 ** 2 + 2 * 768 * 3072 + 9 * 768 + 3072)
    # v1: student fwd+bwd and teacher fwd over 197 tokens per 196 patches, ~8N per token
    assert 8 * n * 197 / 196 < flops_per_patch(v1) < 8.6 * n * 197 / 196
    # 2.0: 16 clones of 40 tokens (39 visible + CLS) at 6N, teacher 2N on 197
    assert flops_per_patch(v2) > (16 * 40 * 6 * n + 197 * 2 * n) / 196


# ------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("recipe", RECIPES)
def test_engine_matches_reference_for_10_steps(images_cache, tmp_path, recipe, capsys):
    from d2v_fast.trainer import Trainer

    cfg = tiny(recipe, images_cache, max_steps=10, progress=True)
    corpus = IMAGES.open_corpus(cfg)
    tr = Trainer(cfg, corpus, tmp_path)
    state = copy.deepcopy(tr.model.state_dict())
    engine = [r["loss"] for r in tr.fit()]
    assert "patches/s=" in capsys.readouterr().err  # the progress bar counts the modality's unit
    ref = reference_image_losses(cfg, corpus, 10, engine_state=state)
    assert len(engine) == len(ref) == 10
    for step, (a, b) in enumerate(zip(engine, ref), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: engine {a} reference {b}"
    assert engine[0] != engine[-1]


def test_stop_and_resume_is_bitwise_identical(images_cache, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    fixed = cli("data2vec2", images_cache, "--optim.total_steps", "6")
    assert pretrain.main(fixed + ["--out", str(full), "--max-steps", "6"]) == 0
    assert pretrain.main(fixed + ["--out", str(part), "--max-steps", "3", "--train.ckpt_every", "3"]) == 0
    assert pretrain.main(fixed + ["--out", str(part), "--max-steps", "6", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert losses(part) == losses(full)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, parallel", [("data2vec", "ddp"), ("data2vec2", "fsdp")])
def test_two_processes_match_one(images_cache, tmp_path, recipe, parallel):
    # the 2.0 decoder's mask noise is drawn per rank (its own seed): off, so the runs must agree
    args = cli(recipe, images_cache, "--max-steps", "4", "--recipe.mask_noise_std", "0")
    env = subprocess_env(images_cache)
    one = subprocess.run([sys.executable, "-m", "d2v_fast.pretrain", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "d2v_fast.pretrain", *args, "--parallel", parallel, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


# ------------------------------------------------------------------ export and warm start
@pytest.mark.parametrize("recipe", RECIPES)
def test_export_loads_in_transformers_and_matches_on_photos_then_init_from(images_cache, tmp_path, recipe, capsys):
    transformers = pytest.importorskip("transformers")
    from d2v_fast import export as export_mod
    from d2v_fast.checkpoint import load_checkpoint

    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    probe = ["--train.probe_task", "builtin"] if recipe == "data2vec" else []  # the end-of-job probe, once
    assert pretrain.main(cli(recipe, images_cache, "--max-steps", "2", "--out", str(run), *probe)) == 0
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert all(r["patches_per_s"] > 0 and r["tokens_per_s"] == r["patches_per_s"] for r in recs)  # old name: one release
    if probe:
        result = json.loads((run / "probe.json").read_text())
        assert result["classes"] == 10 and result["examples"]["test"] == 50  # the t10k photos of the small corpus
        assert 0 <= result["random_init"]["accuracy"] <= 1 and result["test_held_out_of_pretraining"] is True
        assert result["task"].startswith("Fashion-MNIST's 10 classes") and result["unit"] == "images"
        assert "images (Fashion-MNIST" in linear_probe.details(result) and "documents" not in linear_probe.details(result)
    assert export_mod.main([str(run), str(hf_dir)]) == 0
    assert {p.name for p in hf_dir.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                  "d2v_fast.json"}
    assert not list(tmp_path.glob(".*partial*"))
    proc = json.loads((hf_dir / "preprocessor_config.json").read_text())
    assert proc["image_mean"] == [0.485, 0.456, 0.406] and proc["image_std"] == [0.229, 0.224, 0.225]
    hf, info = transformers.Data2VecVisionModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    corpus = open_images(images_cache)
    task = image_probe_task(corpus)
    photos = task.images[-8:]  # t10k photos
    state = load_checkpoint(sorted((run / "checkpoints").iterdir())[-1])
    ours = IMAGES.build_encoder(preset("tiny", recipe, "images").model).eval()
    ours.load_state_dict({k[len("student.encoder."):]: v for k, v in state["model"].items()
                          if k.startswith("student.encoder.")})
    from d2v_fast.data.images.augment import AugmentConfig, augment_batch

    aug = AugmentConfig(size=32, scale=(1.0, 1.0), flip=False, color_jitter=0.0)
    pixels = torch.from_numpy(corpus.batch(photos)[0]).permute(0, 3, 1, 2)
    full = torch.tensor([[0, 0, 32, 32, 0, 1, 1, 1]] * len(photos), dtype=torch.float64)
    x = augment_batch(pixels, full, aug)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf.eval()(pixel_values=x).last_hidden_state, rtol=0, atol=1e-5)
    # the pooled features of the probe come from the same encoder
    assert pooled_features(ours, corpus, photos).shape == (8, 128)
    teacher_dir = tmp_path / "hf-teacher"  # --weights teacher: the EMA of the whole encoder
    assert export_mod.main([str(run), str(teacher_dir), "--weights", "teacher"]) == 0
    hf_t = transformers.Data2VecVisionModel.from_pretrained(teacher_dir)
    want = {k[len("teacher."):]: v for k, v in state["model"].items() if k.startswith("teacher.")}
    assert all(torch.equal(hf_t.state_dict()[k], v) for k, v in want.items() if k in hf_t.state_dict())
    assert set(want) <= set(hf_t.state_dict())

    warm = tmp_path / "warm"
    rc = pretrain.main(cli(recipe, images_cache, "--max-steps", "0", "--init-from", str(hf_dir), "--out", str(warm)))
    assert rc == 0, capsys.readouterr().err
    started = load_checkpoint(sorted((warm / "checkpoints").iterdir())[-1])["model"]
    for k, v in state["model"].items():
        if k.startswith("student.encoder."):
            assert torch.equal(started[k], v), k
            assert torch.equal(started["teacher." + k[len("student.encoder."):]], v), k


def test_a_run_on_unlabelled_images_is_probed_on_the_builtin_photos_and_says_so(images_cache, tmp_path, monkeypatch,
                                                                               capsys):
    import dataclasses

    import numpy as np
    from PIL import Image

    from d2v_fast.checkpoint import ENCODER_FILE, save_encoder
    from d2v_fast.data.images.prepare import prepare_images
    from d2v_fast.models.vision import VisionEncoder, vision_config

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(src / f"{i}.png")
    own = prepare_images(tmp_path / "own", [str(src)], size=32, workers=1, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    cfg = vision_config("tiny", "data2vec")
    save_encoder(run / ENCODER_FILE, VisionEncoder(cfg).state_dict(), dataclasses.asdict(cfg), 0, modality="images")
    (run / "config.json").write_text(json.dumps({"modality": "images", "data_dir": str(own)}))
    monkeypatch.setattr(builtin, "builtin_images", lambda progress=True: images_cache)  # the small one
    result = probing.probe_path(run, floor_inits=0)
    err = capsys.readouterr().err
    assert f"probe: {own} has no labelled held-out (t10k) split; probing on the built-in Fashion-MNIST photos " \
           f"instead" in err, err
    assert result["task"] == (f"Fashion-MNIST's 10 classes (the built-in photos; test: its t10k photos), not the "
                              f"run's own images: {own} has no labelled held-out (t10k) split")
    assert result["test_held_out_of_pretraining"] is None and "images (Fashion-MNIST" in linear_probe.details(result)


def _auto_processor(proc_dict, directory):
    transformers = pytest.importorskip("transformers")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(proc_dict))
    return transformers.AutoImageProcessor.from_pretrained(directory)


def _photo(w, h):
    """An RGB photo with detail at every scale (stripes, gradients)."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([128 + 100 * np.sin(xx / 3.1), 128 + 100 * np.cos(yy / 2.3), (3 * xx + 5 * yy) % 256],
                    -1).astype(np.uint8)


def test_exported_image_processor_reproduces_the_preprocessing(images_cache, tmp_path):
    """A raw photo through the exported processor (``AutoImageProcessor``) and through the
    engine's own path (the corpus, then ``whole_photos``, what the probe feeds the model) gives
    the same tensor: the built-in photos (padded, not resized) and prepared photos of several
    shapes; prepared at a larger size than the model's, the same crop within resampling."""
    import dataclasses

    from PIL import Image

    from d2v_fast.data.images.prepare import prepare_images
    from d2v_fast.modalities.images import image_processor_dict, whole_photos
    from d2v_fast.models.vision import VisionEncoder, vision_config

    enc = vision_config("tiny", "data2vec")
    assert enc.image_size == 32
    # the built-in corpus, through a real export: a raw 28 x 28 greyscale Fashion-MNIST photo
    corpus = open_images(images_cache)
    raw, _ = builtin.load_fashion_mnist()
    hf_dir = tmp_path / "hf"
    IMAGES.export_hf(VisionEncoder(enc).state_dict(), dataclasses.asdict(enc), hf_dir,
                     state={"corpus": {"path": str(images_cache)}, "config": {"data": {"path": ""}}})
    import transformers

    proc = transformers.AutoImageProcessor.from_pretrained(hf_dir)
    for i in (3, LIMIT):  # a train photo and a t10k one
        theirs = proc(Image.fromarray(raw[i if i < LIMIT else 60000]), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(theirs, whole_photos(corpus, [i], 32), rtol=0, atol=1e-5)
    # photos prepared by d2v_fast.data.images.prepare (the long side of 120 x 90 truncates)
    shapes = [(120, 90), (45, 80), (64, 64), (33, 100)]
    src = tmp_path / "raw"
    src.mkdir()
    for k, (w, h) in enumerate(shapes):
        Image.fromarray(_photo(w, h)).save(src / f"{k}.png")
    for size, atol in ((32, 1e-5), (48, None)):
        prepared = open_images(prepare_images(tmp_path / f"c{size}", [str(src)], size=size, workers=1, progress=False))
        proc = _auto_processor(image_processor_dict(enc, prepared.meta), tmp_path / f"p{size}")
        for k in range(len(shapes)):
            theirs = proc(Image.open(src / f"{k}.png"), return_tensors="pt")["pixel_values"]
            ours = whole_photos(prepared, [k], 32)
            if atol:
                torch.testing.assert_close(theirs, ours, rtol=0, atol=atol)
            else:  # resized twice in training (to 48, then 32), once here: the same crop, resampled apart
                gap, corr = (theirs - ours).abs().mean(), torch.corrcoef(torch.stack([theirs.flatten(), ours.flatten()]))
                assert gap < 0.15 and corr[0, 1] > 0.97, (shapes[k], gap, corr)  # measured: <= 0.11, >= 0.98


def test_init_from_a_text_model_or_other_sizes_is_one_line(images_cache, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "data2vec-text"}))
    rc = pretrain.main(cli("data2vec", images_cache, "--max-steps", "0", "--init-from", str(hf_dir),
                           "--out", str(tmp_path / "r")))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "data2vec-vision" in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--recipe.mask_patches", "64"], "--recipe.mask_patches 64: must be in [1, 63]"),
    (["--model.image_size", "30"], "--model.image_size 30: must be a multiple of --model.patch_size (4)"),
    (["--train.probe_every", "5", "--train.probe_task", "builtin"], "--train.probe_every 5: images probe at the end"),
    (["--train.probe_task", "x.jsonl"], "--train.probe_task 'x.jsonl': images probe the corpus's own labels"),
    (["--data.crop_scale", "0.5,0.2"], "--data.crop_scale '0.5,0.2': expected 0 < min <= max <= 1"),
    (["--recipe.cls_loss_weight", "1"], "--recipe.cls_loss_weight 1.0: only data2vec2 has a CLS loss"),
    (["--train.attention", "flash"], "--train.attention 'flash': the flash kernel takes no attention bias"),
])
def test_bad_image_flags_stop_with_one_line_and_exit_2(images_cache, tmp_path, argv, needle, capsys):
    rc = pretrain.main(cli("data2vec", images_cache, "--out", str(tmp_path / "r"), *argv))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "r").exists()


def test_step_benchmark_has_image_rows(tmp_path, capsys):
    from d2v_fast import bench

    out = tmp_path / "step.json"
    for recipe in RECIPES:
        assert bench.main(["--modality", "images", "--recipe", recipe, "--config", "tiny", "--batch-size", "4",
                           "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
        record = json.loads(out.read_text())
        assert record["modality"] == "images" and record["recipe"] == recipe
        assert [r["provider"] for r in record["rows"]] == ["d2v_fast", "reference"]
        assert all(r["unit"] == "patches" and r["tokens_per_s"] > 0 for r in record["rows"])


def test_augmenting_on_the_device_equals_augmenting_in_the_workers(images_cache):
    """GPU training ships uint8 photos and augments them in the student (pixels_of); CPU
    training augments in the loader workers: the same pixels either way."""
    from d2v_fast.modalities.images import pixels_of

    cfg = tiny("data2vec", images_cache)
    corpus = open_images(images_cache)
    from d2v_fast.data.images.dataset import build_image_dataloader

    for device, on_device in (("cuda", True), ("cpu", False), ("auto", torch.cuda.is_available())):
        cfg.train.device = device
        assert IMAGES.augment_on_device(cfg) == on_device
    batches = []
    for on_device in (True, False):
        loader = build_image_dataloader(corpus, grid=cfg.model.grid, micro_batch_size=8, global_batch_size=8,
                                        masking=IMAGES.masking_config(cfg), augment=IMAGES.augment_config(cfg),
                                        num_workers=0, split=IMAGES.train_split(corpus),
                                        augment_in_worker=not on_device)
        batches.append(next(iter(loader)))
    shipped, ready = batches
    assert shipped["pixels"].dtype == torch.uint8 and ready["pixels"].dtype == torch.float32
    assert torch.equal(shipped["mask"], ready["mask"]) and shipped["padding_mask"] is None
    torch.testing.assert_close(pixels_of(shipped), ready["pixels"], rtol=0, atol=0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_engine_with_triton_kernels_matches_reference(images_cache, tmp_path, recipe):
    """The fused kernels (Triton's interpreter on CPU) on image shapes: the CLS-skipping
    gather, strided teacher layers (CLS dropped) into build_targets, the cloned gather of
    visible patches and the decoder's scatter."""
    from d2v_fast.trainer import Trainer

    cfg = tiny(recipe, images_cache, max_steps=3, batch_size=4)
    cfg.train.kernels = "triton"
    corpus = IMAGES.open_corpus(cfg)
    try:
        tr = Trainer(cfg, corpus, tmp_path)
        assert ops.kernels_backend(torch.zeros(1)) == "triton"
        state = copy.deepcopy(tr.model.state_dict())
        engine = [r["loss"] for r in tr.fit()]
    finally:
        ops.set_kernels("auto")
    ref = reference_image_losses(cfg, corpus, 3, engine_state=state)
    for step, (a, b) in enumerate(zip(engine, ref), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: engine {a} reference {b}"
