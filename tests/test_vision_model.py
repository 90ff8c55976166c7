"""The image encoder against transformers' Data2VecVisionModel: names, config, outputs."""
import pytest
import torch

from d2v_fast.models.vision import (
    VisionEncoder,
    attention_backend,
    config_from_hf,
    hf_config_dict,
    keep_visible,
    relative_position_index,
    sincos_positions_2d,
    vision_config,
)

transformers = pytest.importorskip("transformers")
from transformers import Data2VecVisionConfig, Data2VecVisionModel

RECIPES = ("data2vec", "data2vec2")


def tiny(recipe, **kw):
    # mask token on in both flavours so HF's bool_masked_pos path can be compared
    return vision_config("tiny", recipe, use_mask_token=True, **kw)


def perturbed(cfg, seed=0):
    """An encoder whose every parameter is moved off its init (zero tables, unit norms and
    1e-4 layer scales would hide wrong wiring)."""
    torch.manual_seed(seed)
    model = VisionEncoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_twin(model):
    hf = Data2VecVisionModel(Data2VecVisionConfig(**hf_config_dict(model.config))).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("recipe", RECIPES)
def test_state_dict_keys_match_hf_and_load_both_ways(recipe):
    cfg = tiny(recipe)
    ours = VisionEncoder(cfg)
    hf = Data2VecVisionModel(Data2VecVisionConfig(**hf_config_dict(cfg)))
    assert set(ours.state_dict()) == set(hf.state_dict())
    hf.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(hf.state_dict(), strict=True)
    for name in ours.state_dict():
        assert "gamma" not in name and "beta" not in name  # renamed by HF's loader
    table = "encoder.relative_position_bias.relative_position_bias_table"
    assert (table in ours.state_dict()) == (recipe == "data2vec")
    assert ("encoder.layer.0.lambda_1" in ours.state_dict()) == (recipe == "data2vec")
    assert ("embeddings.position_embeddings" in ours.state_dict()) == (recipe == "data2vec2")
    assert "encoder.layer.0.attention.attention.key.bias" not in ours.state_dict()


@pytest.mark.parametrize("size", ["base", "large"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_presets_have_hf_shapes(size, recipe):
    cfg = vision_config(size, recipe)
    with torch.device("meta"):
        ours = VisionEncoder(cfg)
        hf = Data2VecVisionModel(Data2VecVisionConfig(**hf_config_dict(cfg)))
    theirs = hf.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    if size == "base":  # ViT-B/16: 85.8M parameters outside the patch embedding, CLS and mask token
        assert 85_000_000 < ours.num_params() < 86_500_000


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("recipe", RECIPES)
def test_last_hidden_state_equals_hf(recipe, masked):
    model = perturbed(tiny(recipe))
    hf = hf_twin(model)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    mask = (torch.rand(3, 64, generator=gen) < 0.6) if masked else None
    with torch.no_grad():
        ours = model(pixels, mask)
        theirs = hf(pixels, bool_masked_pos=mask).last_hidden_state
    assert ours.shape == (3, 65, 128)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if masked:  # the mask changes the output, so the comparison above saw it used
        assert (model(pixels) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("recipe", RECIPES)
def test_collected_block_and_ffn_outputs_equal_hf(recipe):
    model = perturbed(tiny(recipe))
    hf = hf_twin(model)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ffn_hf = []
    hooks = [layer.output.register_forward_hook(lambda m, i, o: ffn_hf.append(o)) for layer in hf.encoder.layer]
    with torch.no_grad():
        out = hf(pixels, output_hidden_states=True)
        _, blocks = model.encode(pixels, collect="block")
        _, ffns = model.encode(pixels, collect="ffn")
    for h in hooks:
        h.remove()
    assert len(blocks) == len(ffns) == 4
    for ours, theirs in zip(blocks, out.hidden_states[1:]):  # hidden_states[0] is the embedding output
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    for ours, theirs in zip(ffns, ffn_hf):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_hf_config_round_trip():
    for recipe in RECIPES:
        cfg = vision_config("base", recipe)
        hf_cfg = Data2VecVisionConfig(**hf_config_dict(cfg))
        assert hf_cfg.use_mean_pooling is False and hf_cfg.model_type == "data2vec-vision"
        assert hf_cfg.layer_norm_eps == 1e-6 and hf_cfg.hidden_act == "gelu"
        assert config_from_hf(hf_cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="use_mean_pooling"):
        config_from_hf(Data2VecVisionConfig().to_dict())  # HF's defaults: mean pooling, no final layernorm


def test_drop_masked_keeps_cls_and_visible_patches_in_order():
    model = perturbed(vision_config("tiny", "data2vec2"))
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :50], mask[1, 14:] = True, True
    h = model.embeddings(pixels)
    kept = keep_visible(h, mask)
    assert kept.shape == (2, 15, 128)
    assert torch.equal(keep_visible(h, mask, kept=14), kept)  # the count from the host: the same rows
    torch.testing.assert_close(kept[0], h[0, [0] + list(range(51, 65))])
    torch.testing.assert_close(kept[1], h[1, :15])
    out, _ = model.encode(pixels, mask, drop_masked=True)
    assert out.shape == (2, 15, 128)
    mask[1, 0] = True
    with pytest.raises(ValueError, match="same number"):
        keep_visible(h, mask)


def test_relative_bias_rejects_dropped_patches():
    model = VisionEncoder(vision_config("tiny", "data2vec"))
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :8] = True
    with pytest.raises(ValueError, match="mask token"):
        model.encode(torch.randn(1, 3, 32, 32), mask, drop_masked=True)


def test_position_tables():
    index = relative_position_index((3, 4))
    assert index.shape == (13, 13) and int(index.max()) == 5 * 7 + 2
    assert index[1, 1] == index[2, 2] == (3 - 1) * 7 + (4 - 1)  # same offset (0, 0)
    assert index[0, 5] == 35 and index[5, 0] == 36 and index[0, 0] == 37
    table = sincos_positions_2d((8, 8), 128)
    assert table.shape == (65, 128) and table[0].abs().max() == 0
    assert table.abs().max() <= 1 and len({tuple(r) for r in table[1:].tolist()}) == 64


def test_relative_bias_gets_gradient_and_training_mode_runs():
    cfg = vision_config("tiny", "data2vec")
    model = perturbed(cfg).train()
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2, 64) < 0.5)
    out.square().mean().backward()
    table = model.encoder.relative_position_bias.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert model.embeddings.mask_token.grad.abs().sum() > 0
    assert model.encoder.layer[-1].drop_path == pytest.approx(0.25)  # linear stochastic depth


def test_attention_backend_is_measured_on_cpu(capfd):
    # Recorded in docs/images.md: with a bias that needs a gradient (v1 training) PyTorch's
    # CPU SDPA runs the math kernel; without one (teacher, eval, 2.0) the CPU flash kernel.
    v1 = VisionEncoder(vision_config("tiny", "data2vec"))
    assert attention_backend(v1, backward=True) == "math"
    assert attention_backend(v1, backward=False) == "flash (CPU)"
    assert attention_backend(VisionEncoder(vision_config("tiny", "data2vec2")), backward=True) == "flash (CPU)"
    out, err = capfd.readouterr()  # the measurement prints nothing (torch.profiler's start/stop did)
    assert out == "" and err == "", (out, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attention_backend_on_gpu_is_not_math():
    model = VisionEncoder(vision_config("base", "data2vec")).cuda()
    backend = attention_backend(model, "cuda", torch.bfloat16, batch=8, backward=True)
    assert backend in ("memory-efficient", "cudnn", "flash"), backend


@pytest.mark.parametrize("recipe", RECIPES)
def test_saved_directory_loads_with_from_pretrained_on_real_photos(tmp_path, monkeypatch, recipe):
    """config.json + model.safetensors as the exporter will write them: from_pretrained finds
    no missing or unexpected keys and matches on Fashion-MNIST photos (the built-in corpus)."""
    import json

    from safetensors.torch import save_file

    from d2v_fast.data.images import builtin
    from d2v_fast.data.images.augment import AugmentConfig, augment_batch, draw_params
    from d2v_fast.data.images.corpus import open_images

    if not (builtin.source_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed: {builtin.INSTALL_HINT}")
    monkeypatch.setenv("D2V_FAST_CACHE", str(tmp_path / "cache"))
    corpus = open_images(builtin.builtin_images(limit=60, progress=False))
    pixels = torch.from_numpy(corpus.batch(range(60, 68))[0]).permute(0, 3, 1, 2)  # t10k photos
    cfg = AugmentConfig(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, color_jitter=0.0)
    images = augment_batch(pixels, draw_params(32, 32, cfg, seed=0, epoch=0, indices=torch.arange(8)), cfg)

    model = perturbed(vision_config("tiny", recipe))
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    hf, info = Data2VecVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(model(images), hf.eval()(images).last_hidden_state, rtol=0, atol=1e-5)


def test_keep_visible_gathers_clones_without_repeating():
    model = perturbed(vision_config("tiny", "data2vec2"))
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.rand(6, 64, generator=torch.Generator().manual_seed(3)).argsort(1) < 50  # 3 clones, 14 kept each
    h = model.embeddings(pixels)
    kept = keep_visible(h, mask)
    assert kept.shape == (6, 15, 128)
    for r in range(6):
        rows = [0] + [1 + t for t in range(64) if not mask[r, t]]
        torch.testing.assert_close(kept[r], h[r // 3, rows])


def test_grid_decoder_shapes_residuals_and_gradients():
    from d2v_fast.models.vision import GridDecoder

    dec = GridDecoder(128, (8, 8), layers=6, kernel=3, groups=16)
    assert dec.convs[0].weight.shape == (128, 8, 3, 3)  # grouped: 128 / 16 input channels per group
    x = torch.randn(4, 64, 128, requires_grad=True)
    mask = torch.zeros(4, 64, dtype=torch.bool)
    mask[:, ::3] = True
    out = dec(x, mask)
    assert out.shape == (int(mask.sum()), 128)
    out.square().sum().backward()
    assert x.grad[~mask].abs().sum() > 0  # visible patches feed the masked predictions (3x3 convs)
    # the convolutions see the grid: moving a patch's input changes only predictions nearby
    x2 = x.detach().clone()
    x2[0, 0] += 10
    delta = (dec(x2, mask) - dec(x.detach(), mask)).abs().sum(1).view(4, -1)[0]
    masked_positions = mask[0].nonzero().squeeze(1)
    far = [i for i, t in enumerate(masked_positions.tolist()) if max(t // 8, t % 8) > 6]  # > 6 convs away
    assert delta[0] > 0 and all(delta[i] == 0 for i in far)


def test_hf_image_processor_config():
    import numpy as np
    from PIL import Image
    from transformers import BeitImageProcessor

    from d2v_fast.data.images.augment import IMAGENET_MEAN, IMAGENET_STD
    from d2v_fast.models.vision import hf_image_processor_dict

    d = hf_image_processor_dict(vision_config("base", "data2vec"), IMAGENET_MEAN, IMAGENET_STD)
    assert d["size"] == {"height": 256, "width": 256} and d["crop_size"] == {"height": 224, "width": 224}
    proc = BeitImageProcessor(**{k: v for k, v in d.items() if k != "image_processor_type"})
    colour = np.array([200, 100, 50], np.uint8)
    out = proc(Image.fromarray(np.broadcast_to(colour, (300, 400, 3)).copy()), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 224, 224)
    want = (torch.tensor(colour / 255.0) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 100, 100].double(), want, rtol=0, atol=1e-5)
