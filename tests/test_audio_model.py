"""The speech encoder against Hugging Face ``Data2VecAudioModel``: names, config, outputs."""
import json

import numpy as np
import pytest
import torch

from d2v_fast.models.audio import (AUDIO_PRESETS, AudioEncoder, audio_config, config_from_hf, forward_flops,
                                   hf_config_dict, hf_preprocessor_dict, num_frames, run_audio_layers)

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra (pip install -e '.[dev]')")


def hf_twin(ours: AudioEncoder):
    """A Hugging Face model built from our config dict, holding our weights (strict load)."""
    hf_cfg = transformers.Data2VecAudioConfig(**hf_config_dict(ours.config))
    hf_cfg._attn_implementation = "eager"  # the plain reference, not the same SDPA call as ours
    hf = transformers.Data2VecAudioModel(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AudioEncoder(audio_config("tiny")).eval()


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_state_dict_keys_and_shapes_match_hugging_face(preset):
    cfg = audio_config(preset)
    with torch.device("meta"):  # base/large only for their key list: no memory, no init time
        ours = AudioEncoder(cfg)
        hf = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**hf_config_dict(cfg)))
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert set(a) - set(b) == set() and set(b) - set(a) == set()
    assert a == b
    assert "masked_spec_embed" in a and "encoder.pos_conv_embed.layers.0.conv.weight" in a


def test_base_preset_is_the_published_size():
    cfg = audio_config("base")
    with torch.device("meta"):
        n = sum(p.numel() for p in AudioEncoder(cfg).parameters())
    assert 93_000_000 < n < 94_000_000  # data2vec-audio-base: 93.2M without a head
    assert cfg.samples_per_frame == 320 and cfg.receptive_field == 400


def test_strict_load_both_ways(tiny):
    hf = hf_twin(tiny)
    back = AudioEncoder(audio_config("tiny"))
    back.load_state_dict(hf.state_dict(), strict=True)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.mark.parametrize("num_samples", [400, 401, 3333, 16000 + 7])
def test_last_hidden_state_equals_hugging_face(tiny, num_samples):
    hf = hf_twin(tiny)
    torch.manual_seed(num_samples)
    x = torch.randn(2, num_samples)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        out = tiny(x)
    assert out.shape == ref.shape == (2, num_frames(tiny.config, num_samples), 128)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_padded_batch_equals_hugging_face_on_real_frames(tiny):
    hf = hf_twin(tiny)
    torch.manual_seed(1)
    lengths = torch.tensor([8000, 5123, 2001])
    x = torch.randn(3, 8000)
    am = (torch.arange(8000)[None] < lengths[:, None]).long()
    x = x * am
    with torch.no_grad():
        ref = hf(x, attention_mask=am).last_hidden_state
        out = tiny(x, attention_mask=am)
    keep = torch.arange(out.shape[1])[None] < num_frames(tiny.config, lengths)[:, None]
    assert not bool(keep.all())
    torch.testing.assert_close(out[keep], ref[keep], rtol=0, atol=1e-5)


def test_frame_mask_uses_masked_spec_embed_like_hugging_face(tiny):
    hf = hf_twin(tiny)
    x = torch.randn(2, 6000)
    T = num_frames(tiny.config, 6000)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 3:13] = True
    mask[1, 0:10] = True
    with torch.no_grad():
        ref = hf(x, mask_time_indices=mask).last_hidden_state
        out = tiny(x, frame_mask=mask)
        unmasked = tiny(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - unmasked).abs().amax() > 1e-2  # the mask changed something


def test_ffn_outputs_are_the_pre_residual_feed_forward(tiny):
    x = torch.randn(2, 4000)
    with torch.no_grad():
        h, ffns = tiny.encode(x, collect_ffn=True)
        assert len(ffns) == tiny.config.num_layers
        # recompute the last layer by hand from the layer before it
        h0 = tiny.embed(tiny.frame_features(x))
        hs, _ = run_audio_layers(tiny.encoder.layers[:-1], h0)
        last = tiny.encoder.layers[-1]
        mid = last.layer_norm(hs + last.attention.out_proj(
            torch.nn.functional.scaled_dot_product_attention(
                *(lin(hs).view(2, -1, 4, 32).transpose(1, 2)
                  for lin in (last.attention.q_proj, last.attention.k_proj, last.attention.v_proj))
            ).transpose(1, 2).reshape(hs.shape)))
        ffn = last.feed_forward.output_dense(torch.nn.functional.gelu(last.feed_forward.intermediate_dense(mid)))
    torch.testing.assert_close(ffns[-1], ffn, rtol=0, atol=1e-5)
    torch.testing.assert_close(h, last.final_layer_norm(mid + ffn), rtol=0, atol=1e-5)


def test_embed_visible_keeps_unmasked_frames_after_zeroed_positional_conv(tiny):
    x = torch.randn(2, 6000)
    with torch.no_grad():
        f = tiny.frame_features(x)
        T = f.shape[1]
        mask = torch.zeros(2, T, dtype=torch.bool)
        mask[0, :T // 2] = True
        mask[1, T - T // 2:] = True
        vis = tiny.embed_visible(f, mask)
        zeroed = f.masked_fill(mask[..., None], 0)
        full = tiny.encoder.layer_norm(zeroed + tiny.encoder.pos_conv_embed(zeroed))
    assert vis.shape == (2, T - T // 2, 128)
    torch.testing.assert_close(vis, full[~mask].view(2, -1, 128))
    with pytest.raises(ValueError, match="same number"):
        tiny.embed_visible(f, mask.index_fill(1, torch.tensor([T - 1]), True))


def test_layerdrop_skips_layers_in_training_only():
    cfg = audio_config("tiny", layerdrop=0.5)
    m = AudioEncoder(cfg)
    x = torch.randn(1, 2000)
    m.train()
    torch.manual_seed(3)
    counts = {len(m.encode(x, collect_ffn=True)[1]) for _ in range(12)}
    assert len(counts) > 1 and max(counts) <= cfg.num_layers
    m.eval()
    assert len(m.encode(x, collect_ffn=True)[1]) == cfg.num_layers


def test_hf_config_round_trip_and_preprocessor():
    for preset in AUDIO_PRESETS:
        cfg = audio_config(preset)
        d = hf_config_dict(cfg)
        json.dumps(d)  # JSON-able as written
        hf_cfg = transformers.Data2VecAudioConfig(**d)
        assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, list(hf_cfg.conv_dim)) == (
            cfg.hidden_size, cfg.num_layers, list(cfg.conv_dim))
        assert hf_cfg.num_conv_pos_embeddings == cfg.pos_conv_depth and hf_cfg.conv_pos_kernel_size == 19
        assert config_from_hf(hf_cfg.to_dict()) == cfg
    fe = transformers.Wav2Vec2FeatureExtractor(**{k: v for k, v in hf_preprocessor_dict().items()
                                                   if k != "feature_extractor_type"})
    y = fe([0.5 * torch.randn(1234).numpy() + 3.0], sampling_rate=16000, return_tensors="pt").input_values
    assert abs(float(y.mean())) < 1e-4 and abs(float(y.std()) - 1) < 1e-2


def test_config_from_hf_refuses_other_models():
    with pytest.raises(ValueError, match="data2vec-audio"):
        config_from_hf({"model_type": "wav2vec2"})


def test_even_positional_kernel_keeps_length():
    cfg = audio_config("tiny", pos_conv_kernel=16)
    m = AudioEncoder(cfg).eval()
    hf_cfg = transformers.Data2VecAudioConfig(**hf_config_dict(cfg))
    hf = transformers.Data2VecAudioModel(hf_cfg).eval()
    hf.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 3000)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).last_hidden_state, rtol=0, atol=1e-5)


def test_flops_count_matches_parameters_for_long_inputs():
    cfg = audio_config("base")
    with torch.device("meta"):
        m = AudioEncoder(cfg)
    layer_params = sum(p.numel() for p in m.encoder.layers.parameters() if p.dim() == 2)
    T = num_frames(cfg, 16000)
    f = forward_flops(cfg, 16000)
    assert T == 49 and f > 2 * T * layer_params
    # the conv extractor alone, counted by hand for one second: frames after each layer
    # 3199, 1599, 799, 399, 199, 99, 49: about 4.9 GFLOP, a third of the base forward pass
    conv = forward_flops(audio_config("base", num_layers=0, pos_conv_depth=0), 16000) - 2 * T * 512 * 768
    by_hand = 2 * 512 * (3199 * 10 + 512 * 3 * (1599 + 799 + 399 + 199) + 512 * 2 * (99 + 49))
    assert conv == by_hand and 0.3 < conv / f < 0.4


def test_too_short_input_is_refused(tiny):
    with pytest.raises(ValueError, match="at least 400"):
        tiny(torch.randn(1, 399))


def test_teacher_embedding_uses_another_layer_norm_and_no_dropout():
    torch.manual_seed(0)
    student = AudioEncoder(audio_config("tiny", dropout=0.5, feature_dropout=0.5)).train()
    teacher = AudioEncoder(audio_config("tiny")).eval()
    with torch.no_grad():
        teacher.encoder.layer_norm.weight.mul_(2)
        f = student.frame_features(torch.randn(2, 4000))
        t = student.embed(f, layer_norm=teacher.encoder.layer_norm, dropout=False)
        want = teacher.encoder.layer_norm(f + student.encoder.pos_conv_embed(f))
        torch.testing.assert_close(t, want)
        assert not torch.allclose(student.embed(f), student.embed(f))  # dropout on by default in training


def test_hf_directory_loads_with_no_key_problems_and_reads_back(tiny, tmp_path):
    from d2v_fast.models.audio import read_hf_dir, save_hf_dir

    out = save_hf_dir(tiny.state_dict(), tiny.config, tmp_path / "hf", extra={"step": 3})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "d2v_fast.json", "model.safetensors",
                                                     "preprocessor_config.json"]
    assert not list(tmp_path.glob(".hf.partial-*"))
    model, info = transformers.Data2VecAudioModel.from_pretrained(str(out), output_loading_info=True)
    assert (len(info["missing_keys"]), len(info["unexpected_keys"]), len(info["mismatched_keys"])) == (0, 0, 0), info
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(str(out))
    assert fe.sampling_rate == 16000 and fe.do_normalize
    cfg, weights = read_hf_dir(out)
    assert cfg == tiny.config
    back = AudioEncoder(cfg)
    back.load_state_dict(weights, strict=True)
    # a fine-tuning checkpoint (CTC head, nested names) warm-starts the encoder too
    ctc = transformers.Data2VecAudioForCTC(transformers.Data2VecAudioConfig(**hf_config_dict(tiny.config)))
    ctc.save_pretrained(tmp_path / "ctc")
    _, w = read_hf_dir(tmp_path / "ctc")
    assert set(w) == set(tiny.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        save_hf_dir({k: v for k, v in tiny.state_dict().items() if k != "masked_spec_embed"}, tiny.config,
                    tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


POCKETSPHINX = "/usr/share/pocketsphinx/test/data"


def test_matches_hugging_face_on_real_recordings(tiny, tmp_path):
    """Recordings no one here made (Debian pocketsphinx-testdata, BSD-2: LibriVox readings
    and card names at 16 kHz), through our preparation and Hugging Face's extractor."""
    import os

    if not os.path.isdir(POCKETSPHINX):
        pytest.skip("Debian package pocketsphinx-testdata is not installed")
    from d2v_fast.data.audio.corpus import open_audio_corpus
    from d2v_fast.data.audio.dataset import build_audio_dataloader
    from d2v_fast.data.audio.prepare import decode, prepare_audio_corpus

    files = sorted(f"{POCKETSPHINX}/librivox/{f}" for f in os.listdir(f"{POCKETSPHINX}/librivox") if f.endswith(".wav"))
    corpus = open_audio_corpus(prepare_audio_corpus(tmp_path / "real", inputs=files, dtype="float32",
                                                    workers=1, progress=False))
    assert len(corpus) == len(files) == 5
    # our stored utterance is what Hugging Face's feature extractor makes of the file
    fe = transformers.Wav2Vec2FeatureExtractor(**{k: v for k, v in hf_preprocessor_dict().items()
                                                   if k != "feature_extractor_type"})
    wav, rate = decode(files[0])
    hf_in = fe(wav, sampling_rate=rate, return_tensors="np").input_values[0]
    np.testing.assert_allclose(corpus[0], hf_in, atol=2e-5)
    hf = hf_twin(tiny)
    batch = next(iter(build_audio_dataloader(corpus, micro_batch_size=5, global_batch_size=5, num_workers=0)))
    assert batch["waveform"].shape == (5, int(corpus.lengths.min()))
    with torch.no_grad():
        torch.testing.assert_close(tiny(batch["waveform"]), hf(batch["waveform"]).last_hidden_state,
                                   rtol=0, atol=1e-5)
