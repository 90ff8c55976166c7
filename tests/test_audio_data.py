"""Speech data: resampling, corpus preparation (and its refusals), batching, built-in corpus."""
import json
import os

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile", reason="soundfile is a dependency (pip install -e .)")

from d2v_fast.data.audio import prepare as ap  # noqa: E402
from d2v_fast.data.audio.corpus import open_audio_corpus  # noqa: E402
from d2v_fast.data.audio.dataset import (AudioBatchSampler, CropCollator, UtteranceDataset, crop_offset,  # noqa: E402
                                         bucket_order, build_audio_dataloader)
from d2v_fast.data.audio.resample import resample  # noqa: E402
from d2v_fast.errors import UsageError  # noqa: E402


# ----------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_resample_keeps_a_tone(rate):
    t = np.arange(rate * 2) / rate
    y = resample(np.sin(2 * np.pi * 440 * t + 0.3).astype(np.float32), rate, 16000)
    assert len(y) == 32000
    ref = np.sin(2 * np.pi * 440 * np.arange(32000) / 16000 + 0.3)
    assert np.abs(y - ref)[200:-200].max() < 1e-3  # edges see the zero padding


def test_resample_removes_what_16k_cannot_hold():
    t = np.arange(44100) / 44100
    y = resample(np.sin(2 * np.pi * 12000 * t).astype(np.float32), 44100, 16000)
    assert np.sqrt(np.mean(y[200:-200] ** 2)) < 1e-3  # 12 kHz would alias to 4 kHz: > 60 dB down


# ----------------------------------------------------------------------------- preparation
def noise(seconds, rate, channels=1, scale=0.1, seed=0):
    x = np.random.default_rng(seed).standard_normal((int(seconds * rate), channels)).astype(np.float32) * scale
    return x[:, 0] if channels == 1 else x


@pytest.fixture
def audio_dir(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    sf.write(d / "a.wav", noise(3, 16000, seed=1), 16000, subtype="PCM_16")
    sf.write(d / "b.flac", noise(2.5, 44100, channels=2, seed=2), 44100)
    sf.write(d / "sub" / "c.ogg", noise(25, 22050, seed=3), 22050)
    sf.write(d / "short.wav", noise(1, 16000, seed=4), 16000)
    sf.write(d / "silent.wav", np.zeros(48000, np.float32), 16000)
    (d / "notes.txt").write_text("not audio, ignored when walking a directory")
    return d


def prep(inputs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return ap.prepare_audio_corpus(out, inputs=[str(i) for i in inputs], **kw)


def test_prepare_decodes_resamples_normalises_drops_and_crops(audio_dir, tmp_path):
    out = prep([audio_dir], tmp_path / "corpus")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_utterances"] == 3 and meta["sample_rate"] == 16000 and meta["dtype"] == "float16"
    assert meta["dropped"] == {"shorter than min": 1, "silent": 1, "unreadable": 0}
    assert meta["cropped_to_max"] == 0  # 25 s is under the 60 s cap: kept whole, cropped in the loader
    corpus = open_audio_corpus(out)
    # sorted walk: a.wav, b.flac, sub/c.ogg
    assert corpus.lengths.tolist() == [48000, 40000, 400000]
    capped = open_audio_corpus(prep([audio_dir], tmp_path / "capped", max_seconds=20))
    assert capped.lengths.tolist() == [48000, 40000, 320000] and capped.meta["cropped_to_max"] == 1
    for i in range(3):
        x = corpus[i]
        assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02
    # the stored utterance is decode -> mono -> resample -> normalise, to float16 precision
    wav, rate = ap.decode(audio_dir / "b.flac")
    assert rate == 44100 and wav.ndim == 1
    want = ap.to_corpus_audio(wav, rate, "b.flac")
    np.testing.assert_allclose(corpus[1], want, atol=4e-3, rtol=1e-3)
    listing = (out / "utterances.tsv").read_text().splitlines()
    assert len(listing) == 4 and listing[3].endswith("c.ogg")


def test_preparation_shows_its_progress(audio_dir, tmp_path, capsys):
    out = prep([audio_dir], tmp_path / "corpus", progress=True)
    err = capsys.readouterr().err
    assert "utterances: 100%" in err and "5/5" in err and f"wrote {out}: 3 utterances" in err, err


def test_prepare_twice_is_a_no_op_and_refuses_a_different_corpus(audio_dir, tmp_path):
    out = prep([audio_dir], tmp_path / "corpus")
    stamp = (out / "meta.json").stat().st_mtime_ns
    prep([audio_dir], out)
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(UsageError, match="different corpus"):
        prep([audio_dir], out, max_seconds=10)
    prep([audio_dir], out, max_seconds=10, force=True, dtype="float32")
    assert open_audio_corpus(out).lengths.max() == 160000


def test_prepare_with_two_workers_matches_one(audio_dir, tmp_path):
    one = open_audio_corpus(prep([audio_dir], tmp_path / "one"))
    two = open_audio_corpus(prep([audio_dir], tmp_path / "two", workers=2))
    assert one.meta["shards"][0]["sha256"] == two.meta["shards"][0]["sha256"]


def run_cli(argv, capsys):
    rc = ap.main(argv + ["--workers", "1", "--quiet"])
    return rc, capsys.readouterr().err.strip()


def nothing_written(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def _cut(path, nbytes):
    path.write_bytes(path.read_bytes()[:nbytes])


@pytest.mark.parametrize("case", ["corrupt", "empty_dir", "low_rate", "odd_rate", "nan", "all_short", "not_audio",
                                  "truncated_wav", "header_only_wav", "truncated_ogg"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, audio_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    sf.write(bad / "good.wav", noise(3, 16000), 16000)
    expect = {"corrupt": "cannot be decoded as audio", "empty_dir": "holds no .wav/.flac/.ogg/.oga file",
              "low_rate": "below 8000 Hz", "odd_rate": "cannot be resampled here", "nan": "NaN or infinite",
              "all_short": "no usable utterance of at least 2 s", "not_audio": "unsupported file type",
              # the header of 113,600 16-bit samples is 44 bytes: 150,000 bytes hold 74,978 of them
              "truncated_wav": f"{bad / 'z.wav'}: truncated: its header declares 113,600 frames, 74,978 could be read",
              "header_only_wav": f"{bad / 'z.wav'}: truncated: its header declares 113,600 frames, 0 could be read",
              "truncated_ogg": f"{bad / 'z.ogg'}: truncated: its Ogg stream has no end page"}[case]
    target = bad
    if case == "corrupt":
        (bad / "z.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt junk")
    elif case in ("truncated_wav", "header_only_wav"):
        sf.write(bad / "z.wav", noise(113600 / 16000, 16000), 16000, subtype="PCM_16")
        _cut(bad / "z.wav", 150_000 if case == "truncated_wav" else 44)
    elif case == "truncated_ogg":
        sf.write(bad / "z.ogg", noise(4, 16000), 16000)
        _cut(bad / "z.ogg", (bad / "z.ogg").stat().st_size // 2)
    elif case == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "low_rate":
        sf.write(bad / "z.wav", noise(3, 4000), 4000)
    elif case == "odd_rate":
        sf.write(bad / "z.wav", noise(3, 16001), 16001)
    elif case == "nan":
        x = noise(3, 16000)
        x[100] = np.nan
        sf.write(bad / "z.wav", x, 16000, subtype="FLOAT")
    elif case == "all_short":
        (bad / "good.wav").unlink()
        sf.write(bad / "z.wav", noise(1, 16000), 16000)
    elif case == "not_audio":
        target = audio_dir / "notes.txt"
    out = tmp_path / "out" / "corpus"
    rc, err = run_cli(["--input", str(target), "--out", str(out)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err, err
    assert nothing_written(out)


def test_skip_bad_warns_and_keeps_the_rest(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    sf.write(d / "good.wav", noise(3, 16000), 16000)
    (d / "z.flac").write_bytes(b"fLaC garbage")
    sf.write(d / "zz.wav", noise(3, 16000), 16000, subtype="PCM_16")
    _cut(d / "zz.wav", 44 + 2 * 40000)  # 2.5 s of the 3 s its header declares
    out = tmp_path / "corpus"
    rc, err = run_cli(["--input", str(d), "--out", str(out), "--skip-bad"], capsys)
    assert rc == 0 and "warning: skipping" in err and "z.flac" in err
    assert f"warning: skipping {d / 'zz.wav'}: truncated: its header declares 48,000 frames, 40,000 could be read" \
        in err
    assert json.loads((out / "meta.json").read_text())["dropped"]["unreadable"] == 2
    assert open_audio_corpus(out).lengths.tolist() == [48000]


def test_a_truncated_shard_is_refused(audio_dir, tmp_path):
    out = prep([audio_dir], tmp_path / "corpus")
    with open(out / "audio-00000.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UsageError, match="truncated or altered"):
        open_audio_corpus(out)
    with pytest.raises(UsageError, match="not a prepared speech corpus"):
        open_audio_corpus(tmp_path)


# ----------------------------------------------------------------------------- batching
def test_bucket_order_groups_similar_lengths_and_covers_each_utterance_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(32000, 320000, size=1003)
    batches = bucket_order(lengths, 16, seed=1, epoch=0)
    assert batches.shape == (62, 16) and len(set(batches.ravel().tolist())) == 62 * 16
    spread = np.array([lengths[b].max() / lengths[b].min() for b in batches])
    assert np.median(spread) < 1.05  # cropping to the shortest wastes a few percent
    assert not np.array_equal(batches, bucket_order(lengths, 16, seed=1, epoch=1))
    assert np.array_equal(batches, bucket_order(lengths, 16, seed=1, epoch=0))


def test_ranks_split_every_global_batch_and_resume_is_exact():
    lengths = np.random.default_rng(1).integers(32000, 100000, size=100)
    full = list(AudioBatchSampler(lengths, global_batch_size=8, seed=3))
    per_rank = [list(AudioBatchSampler(lengths, global_batch_size=8, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    merged = [x for step in range(12) for r in (0, 1) for x in per_rank[r][step * 4:(step + 1) * 4]]
    assert merged == full and len(full) == 96
    resumed = list(AudioBatchSampler(lengths, global_batch_size=8, seed=3, start=40))
    assert resumed == full[40:]
    with pytest.raises(UsageError, match="not divisible"):
        AudioBatchSampler(lengths, global_batch_size=9, world_size=2)


def test_collator_crops_to_shortest_deterministically(audio_dir, tmp_path):
    corpus = open_audio_corpus(prep([audio_dir], tmp_path / "corpus"))
    ds = UtteranceDataset(corpus)
    masks_seen = []

    def make_masks(T, indices, epoch):
        masks_seen.append((T, indices.tolist(), epoch))
        return {"mask": torch.zeros(len(indices), T, dtype=torch.bool)}

    collate = CropCollator(corpus, seed=5, frames_for=lambda s: (s - 400) // 320 + 1, make_masks=make_masks)
    items = [ds[(2, i)] for i in (0, 1, 2)]
    a, b = collate(items), collate(items)
    assert a["waveform"].shape == (3, 40000) and torch.equal(a["waveform"], b["waveform"])
    assert a["num_frames"] == 124 and a["mask"].shape == (3, 124) and masks_seen[0] == (124, [0, 1, 2], 2)
    # each row is a window of its utterance
    row2 = a["waveform"][2].numpy()
    full = corpus[2]
    starts = [o for o in range(0, len(full) - 40000 + 1) if full[o] == row2[0] and full[o + 1] == row2[1]]
    assert any(np.array_equal(full[o:o + 40000], row2) for o in starts)
    assert not torch.equal(collate([ds[(3, i)] for i in (0, 1, 2)])["waveform"][2], a["waveform"][2])


def test_a_long_utterance_shows_a_different_published_window_each_epoch(audio_dir, tmp_path):
    """Kept whole (25 s, under the cap) and cropped in the loader to --data.max_samples (the
    published 20 s) at an offset keyed by (seed, epoch, index): the windows of the epochs
    cover the whole utterance over time, the same window for the same key."""
    corpus = open_audio_corpus(prep([audio_dir], tmp_path / "corpus"))
    ds = UtteranceDataset(corpus)
    collate = CropCollator(corpus, seed=5, max_samples=320_000)
    full = corpus[2]
    starts = set()
    for epoch in range(12):
        w = collate([ds[(epoch, 2)]])["waveform"][0].numpy()
        assert len(w) == 320_000
        off = crop_offset(5, epoch, 2, len(full) - 320_000)
        np.testing.assert_array_equal(w, full[off:off + 320_000])
        np.testing.assert_array_equal(collate([ds[(epoch, 2)]])["waveform"][0].numpy(), w)
        starts.add(off)
    assert len(starts) > 6 and max(starts) > 40_000  # later windows than the first 20 s


def test_dataloader_yields_cropped_micro_batches(audio_dir, tmp_path):
    corpus = open_audio_corpus(prep([audio_dir], tmp_path / "corpus"))
    loader = build_audio_dataloader(corpus, micro_batch_size=1, global_batch_size=2, num_workers=0, seed=0,
                                    max_samples=16000)
    batches = list(loader)
    assert len(batches) == 2 and all(b["waveform"].shape == (1, 16000) for b in batches)


# ----------------------------------------------------------------------------- built-in corpus
@pytest.fixture(scope="module")
def builtin_speech(tmp_path_factory):
    pytest.importorskip("espeakng_loader", reason="espeakng-loader is a dependency (pip install -e .)")
    from d2v_fast.data.audio.builtin import builtin_speech_corpus

    cache = tmp_path_factory.mktemp("speech_cache")
    old = os.environ.get("D2V_FAST_CACHE")
    os.environ["D2V_FAST_CACHE"] = str(cache)
    try:
        yield builtin_speech_corpus(24, workers=1, progress=False)
    finally:
        if old is None:
            os.environ.pop("D2V_FAST_CACHE", None)
        else:
            os.environ["D2V_FAST_CACHE"] = old


def test_builtin_speech_corpus_is_synthesised_and_cached(builtin_speech):
    from d2v_fast.data.audio.builtin import builtin_speech_corpus, voice_for

    corpus = open_audio_corpus(builtin_speech)
    meta = corpus.meta
    assert meta["num_utterances"] == 24 and "eSpeak NG" in meta["builtin"]["engine"]
    secs = corpus.lengths / 16000
    assert secs.min() >= 2 and 4 < secs.mean() < 20
    # speech, not noise or silence: loud and quiet stretches (syllables and pauses)
    x = corpus[0]
    energy = np.sqrt(np.mean(x[: len(x) // 320 * 320].reshape(-1, 320) ** 2, axis=1))
    assert np.quantile(energy, 0.9) > 10 * np.quantile(energy, 0.1)
    assert len({voice_for(i)["voice"] for i in range(24)}) > 8
    stamp = (builtin_speech / "meta.json").stat().st_mtime_ns
    assert builtin_speech_corpus(24, workers=1, progress=False) == builtin_speech
    assert (builtin_speech / "meta.json").stat().st_mtime_ns == stamp


def test_encoder_matches_hugging_face_on_builtin_speech(builtin_speech):
    transformers = pytest.importorskip("transformers")
    from d2v_fast.models.audio import AudioEncoder, audio_config, hf_config_dict, num_frames

    torch.manual_seed(0)
    ours = AudioEncoder(audio_config("tiny")).eval()
    hf = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**hf_config_dict(ours.config))).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    corpus = open_audio_corpus(builtin_speech)
    loader = build_audio_dataloader(corpus, micro_batch_size=4, global_batch_size=4, num_workers=0,
                                    frames_for=lambda s: num_frames(ours.config, s), max_samples=48000)
    batch = next(iter(loader))
    with torch.no_grad():
        a = ours(batch["waveform"])
        b = hf(batch["waveform"]).last_hidden_state
    assert a.shape[1] == batch["num_frames"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- masks
def test_speech_v1_masks_have_equal_counts_and_the_published_coverage():
    from d2v_fast.data.audio.masking import V1_AUDIO, span_masks

    idx = torch.arange(16)
    v1 = span_masks(500, idx, seed=0, epoch=0, **V1_AUDIO)
    counts = v1.sum(1)
    assert v1.shape == (16, 500) and bool((counts == counts[0]).all())
    assert 0.40 < counts[0] / 500 < 0.47  # 40-46% measured (README), thinned to the batch minimum
    # a row's spans come from (seed, epoch, index, clone) alone: same row alone or in a batch
    # (thinning aside, every masked frame of the batched row is masked in the lone row)
    alone = span_masks(500, idx[3:4], seed=0, epoch=0, **V1_AUDIO)
    assert bool((v1[3] <= alone[0]).all())
    assert not torch.equal(span_masks(500, idx, seed=0, epoch=1, **V1_AUDIO), v1)
    # masked runs are whole spans of 10 before thinning
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, alone[0].numpy().astype(int), 0])))[::2]
    assert runs.min() >= 10
    with pytest.raises(ValueError, match="longer crops"):
        span_masks(4, idx[:1], seed=0, epoch=0, **V1_AUDIO)  # one span covers all 4 frames


def _blocks_before_adjustment(T, index, seed, epoch, clone, mask_prob=0.5, span=5, adjust=0.05):
    """The published algorithm's first stage, written out from the row stream: the frames the
    ``int(T * (mask_prob + adjust) / span)`` centres (drawn with replacement) cover."""
    from d2v_fast.data.audio.masking import _FRAME_BLOCK_KIND
    from d2v_fast.data.masking import _row_key, _RowRng

    rng = _RowRng(_row_key(_FRAME_BLOCK_KIND, seed, epoch, index, clone))
    covered = np.zeros(T, dtype=bool)
    for _ in range(int(T * ((mask_prob + adjust) / span))):
        c = rng.bounded(T)
        covered[np.clip(np.arange(c - span // 2, c - span // 2 + span), 0, T - 1)] = True
    return covered


@pytest.mark.parametrize("T", [499, 999, 250, 99, 13])
def test_speech_v2_block_masks_mask_exactly_half_of_every_clone_row(T):
    """fairseq compute_block_mask_1d (base_audio_only_task.yaml: mask_prob 0.5, mask_length 5,
    mask_prob_adjust 0.05): every clone row of a crop of T frames masks exactly int(0.5 T)
    frames, each row being its blocks of 5 (centres with replacement, clamped at the ends)
    with a uniformly random few frames unmasked or added to reach that count."""
    from d2v_fast.data.audio.masking import V2_AUDIO, block_masks

    idx = torch.tensor([3, 17, 2**33 + 5])
    m = block_masks(T, idx, seed=7, epoch=2, clones=8, **V2_AUDIO)
    assert m.shape == (24, T) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [int(0.5 * T)] * 24
    if T >= 99:  # clones and samples differ (13 frames have one block: rows may repeat)
        assert len({tuple(r.tolist()) for r in m}) == 24
    for r in (0, 9, 23):
        b, c = divmod(r, 8)
        covered = _blocks_before_adjustment(T, int(idx[b]), 7, 2, c)
        row = m[r].numpy()
        n = int(covered.sum())
        if n >= int(0.5 * T):  # trimmed: a subset of the blocks
            assert not (row & ~covered).any()
        else:  # topped up: every block frame kept
            assert not (covered & ~row).any()
        # all but the adjusted frames come from the blocks
        assert int((row != covered).sum()) == abs(n - int(0.5 * T))
    # a row depends on (seed, epoch, index, clone) only: same row alone or in another batch
    alone = block_masks(T, idx[1:2], seed=7, epoch=2, clones=8, **V2_AUDIO)
    assert torch.equal(alone, m[8:16])
    assert not torch.equal(block_masks(T, idx, seed=7, epoch=3, clones=8, **V2_AUDIO), m)


def test_speech_v2_block_masks_are_blocks_of_five_before_adjustment():
    from d2v_fast.data.audio.masking import V2_AUDIO, block_masks

    T = 999
    m = block_masks(T, torch.arange(4), seed=0, epoch=0, clones=8, **V2_AUDIO)
    covered = np.stack([_blocks_before_adjustment(T, b, 0, 0, c) for b in range(4) for c in range(8)])
    # interior runs of the blocks are at least 5 long (joined blocks are longer)
    for row in covered:
        edges = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
        starts, ends = edges[::2], edges[1::2]
        inner = (starts > 0) & (ends < T)
        assert (ends - starts)[inner].min() >= 5
    # the blocks cover about 1 - exp(-0.55) of the frames before the count is fixed; the
    # adjustment moves few frames
    assert 0.38 < covered.mean() < 0.46
    assert (m.numpy() != covered).mean() < 0.12


@pytest.mark.parametrize("T,recipe,clones,B", [(500, "v1", 1, 16), (499, "v2", 8, 4), (23, "v1", 1, 3), (11, "v1", 1, 4),
                                           (61, "v2", 8, 5), (2051, "v1", 1, 7), (6, "v2", 3, 2), (7, "v2", 1, 3),
                                           (1001, "v2", 8, 2), (250, "v2", 2, 3)])
def test_speech_masks_from_the_extension_match_the_python_twin(T, recipe, clones, B):
    """csrc/frame_masking.cpp and its pure-Python twins give the same masks bit for bit, over
    awkward lengths and fresh random sample indices and seeds."""
    from d2v_fast.data.audio import masking
    from d2v_fast.data.masking import _C

    if _C is None:
        pytest.skip("the extension is not importable (D2V_FAST_NO_EXT=1 or no build): nothing to compare")
    assert masking._C is not None, "the built extension lacks the speech masks: rebuild it"
    gen = torch.Generator().manual_seed(T * 1000 + B)
    idx = torch.randint(0, 2**40, (B,), generator=gen)
    seed, epoch = (int(v) for v in torch.randint(0, 2**31, (2,), generator=gen))
    if recipe == "v1":
        kw = masking.V1_AUDIO
        ext = masking.span_masks(T, idx, seed=seed, epoch=epoch, clones=clones, **kw)
        twin = masking._frame_span_mask_python(T, kw["mask_prob"], kw["span"], 1, seed, epoch, idx, clones)
    else:
        kw = masking.V2_AUDIO
        ext = masking.block_masks(T, idx, seed=seed, epoch=epoch, clones=clones, **kw)
        twin = masking._frame_block_mask_python(T, kw["mask_prob"], kw["span"], kw["mask_prob_adjust"], seed, epoch,
                                                idx, clones)
    assert ext.shape == (B * clones, T) and ext.dtype == torch.bool
    assert torch.equal(ext, twin)
    counts = ext.sum(1)
    assert bool((counts == counts[0]).all()) and 0 < int(counts[0]) < T


def test_speech_masks_fall_back_to_python_without_the_extension(monkeypatch):
    from d2v_fast.data.audio import masking

    idx = torch.arange(5) * 7919
    with_ext = masking.span_masks(300, idx, seed=1, epoch=4, **masking.V1_AUDIO)
    blocks = masking.block_masks(301, idx, seed=1, epoch=4, clones=3, **masking.V2_AUDIO)
    monkeypatch.setattr(masking, "_C", None)
    assert torch.equal(masking.span_masks(300, idx, seed=1, epoch=4, **masking.V1_AUDIO), with_ext)
    assert torch.equal(masking.block_masks(301, idx, seed=1, epoch=4, clones=3, **masking.V2_AUDIO), blocks)


def test_command_line_entry_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    from .helpers import ROOT, subprocess_env

    d = tmp_path / "in"
    d.mkdir()
    sf.write(d / "a.wav", noise(2.5, 16000), 16000)
    out = tmp_path / "corpus"
    argv = [sys.executable, "-m", "d2v_fast.data.audio", "--modality", "audio", "--input", str(d), "--out", str(out),
            "--workers", "1", "--quiet"]
    r = subprocess.run(argv, cwd=ROOT, env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert open_audio_corpus(out).lengths.tolist() == [40000]
    r = subprocess.run(argv[:5] + ["--input", str(tmp_path / "nope"), "--out", str(out)], cwd=ROOT,
                       env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --input {tmp_path / 'nope'}: no such file or directory; check the path"]


def test_exported_feature_extractor_reproduces_the_preparation(tmp_path):
    """A 16 kHz recording through the exported ``Wav2Vec2FeatureExtractor`` config
    (``AutoFeatureExtractor``) and through preparation (``to_corpus_audio``) gives the same
    samples: both normalise the whole utterance. (Other rates: the extractor does not
    resample; preparation does.)"""
    transformers = pytest.importorskip("transformers")
    from d2v_fast.models.audio import hf_preprocessor_dict

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_dict()))
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path)
    wav = noise(2.5, 16000, scale=0.3, seed=7) + 0.05  # an offset: the mean is taken out too
    theirs = extractor(wav, sampling_rate=16000, return_tensors="np")["input_values"][0]
    np.testing.assert_allclose(theirs, ap.to_corpus_audio(wav, 16000, "x.wav"), rtol=0, atol=1e-5)
