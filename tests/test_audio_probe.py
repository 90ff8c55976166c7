"""The speech probe: the built-in speaker task (balanced, split by utterance, texts no built-in
speech corpus reads), the end-of-job probe of a speech run, the export's features and
result, determinism, and bad input. Small: a 60-utterance task (5 per variant), a
12-utterance pretraining corpus, 2 training steps of the tiny encoder."""
import json
import os
import re

import numpy as np
import pytest
import torch

from d2v_fast import export, linear_probe, pretrain, probe

pytest.importorskip("espeakng_loader", reason="espeakng-loader is a dependency (pip install -e .)")

PROBE_UTTERANCES = 60


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory):
    """A private cache with a 12-utterance built-in speech corpus and the 60-utterance probe
    task, which the probe of this module's runs uses (``PROBE_UTTERANCES`` is read per call)."""
    from d2v_fast.data.audio import probe_task
    from d2v_fast.data.audio.builtin import builtin_speech_corpus

    cache = tmp_path_factory.mktemp("speech_probe_cache")
    old_env, old_n = os.environ.get("D2V_FAST_CACHE"), probe_task.PROBE_UTTERANCES
    os.environ["D2V_FAST_CACHE"] = str(cache)
    probe_task.PROBE_UTTERANCES = PROBE_UTTERANCES
    try:
        corpus = builtin_speech_corpus(12, workers=1, progress=False)
        task = probe_task.builtin_speech_probe(PROBE_UTTERANCES, workers=2, progress=False)
        yield corpus, task
    finally:
        probe_task.PROBE_UTTERANCES = old_n
        if old_env is None:
            os.environ.pop("D2V_FAST_CACHE", None)
        else:
            os.environ["D2V_FAST_CACHE"] = old_env


@pytest.fixture(scope="module")
def speech_run(speech_cache, tmp_path_factory):
    """A 2-step data2vec speech run (its end-of-job probe on), and its Hugging Face export."""
    corpus, _ = speech_cache
    tmp = tmp_path_factory.mktemp("speech_probe_run")
    run, hf = tmp / "run", tmp / "hf"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = pretrain.main(["--modality", "audio", "--config", "tiny", "--data", str(corpus), "--out", str(run),
                            "--max-steps", "2", "--train.batch_size", "4", "--data.num_workers", "0",
                            "--train.progress", "false"])
    assert rc == 0
    assert export.main([str(run), str(hf)]) == 0
    return run, hf, out.getvalue()


def test_the_task_is_balanced_and_split_by_utterance(speech_cache):
    from d2v_fast.data.audio.builtin import VARIANTS
    from d2v_fast.data.audio.probe_task import read_speech_probe

    _, path = speech_cache
    task = read_speech_probe(path)
    assert task.classes == list(VARIANTS) and len(task.corpus) == PROBE_UTTERANCES
    assert np.bincount(task.labels).tolist() == [5] * 12  # index mod 12, none dropped
    for split, per_class in (("train", 3), ("val", 1), ("test", 1)):
        assert np.bincount([task.labels[i] for i in task.indices(split)]).tolist() == [per_class] * 12
    assert set(task.corpus.lengths.tolist()) == {48_000}  # 3 s each: no padding
    x = task.corpus[0]
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2  # normalised over the 3 s
    # the utterance names carry the voice drawn for them: accents vary within a variant
    names = [l.split("\t")[3] for l in (path / "utterances.tsv").read_text().splitlines()[1:]]
    accents = {n.split()[1] for n, y in zip(names, task.labels) if y == 0}
    assert all(n.split()[1].endswith("+" + VARIANTS[y]) for n, y in zip(names, task.labels)) and len(accents) > 1
    assert task.record["pretraining_texts_available"] > 2000  # the default corpus's 2000 passages fit


def test_no_built_in_corpus_reads_the_probe_texts(monkeypatch):
    """The reserved modules' docstrings go to the probe and never to a corpus, wherever they
    come in the order (a stand-in for the standard library's docstrings)."""
    from d2v_fast.data.audio import builtin, probe_task

    para = lambda w: " ".join([w] * 30) + "."
    docs = [("os", para("alpha")), ("unittest", para("beta")), ("xml", para("gamma")), ("zlibish", para("delta"))]
    monkeypatch.setattr(builtin, "stdlib_labelled_docstrings", lambda workers=None, progress=False: iter(docs))
    monkeypatch.setattr(probe_task, "stdlib_labelled_docstrings", lambda workers=None, progress=False: iter(docs))
    assert builtin.RESERVED_FROM == "unittest"
    assert [t.split()[0] for t in builtin.speech_texts(1, workers=1)] == ["alpha"]
    with pytest.raises(Exception, match="give only 1 speakable texts"):
        builtin.speech_texts(2, workers=1)
    texts, available = probe_task.probe_texts(3, workers=1)
    assert available == 1 and [t.split()[0] for t in texts] == ["beta", "gamma", "delta"]


def test_end_of_job_probe_writes_probe_json(speech_run):
    run, _, stdout = speech_run
    line = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"probe: \d\.\d\d accuracy vs \d\.\d\d at random init", line), stdout
    res = json.loads((run / linear_probe.PROBE_FILE).read_text())
    assert line == linear_probe.summary(res)
    assert res["classes"] == 12 and res["examples"] == {"train": 36, "val": 12, "test": 12}
    assert res["kind"] == "run" and res["test_held_out_of_pretraining"] is True
    assert 0 <= res["random_init"]["accuracy"] <= 1 and res["margin"] == res["accuracy"] - res["random_init"]["accuracy"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # written atomically, nothing left over
    # throughput in the modality's unit (and, this release only, under its old name)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert all(r["frames_per_s"] > 0 and r["tokens_per_s"] == r["frames_per_s"] for r in recs)
    assert "patches_per_s" not in recs[0] and linear_probe.details(res).count("utterances") == 1


def test_export_gives_the_run_dirs_features_and_result_deterministically(speech_run, speech_cache, tmp_path, capsys):
    from d2v_fast.data.audio.probe_task import read_speech_probe
    from d2v_fast.pretrained import load_pretrained
    from d2v_fast.models.audio import AudioEncoder, read_hf_dir
    from d2v_fast.modalities.audio import pooled_speech_features

    run, hf, _ = speech_run
    task = read_speech_probe(speech_cache[1])
    cfg, weights = read_hf_dir(hf)
    exported = AudioEncoder(cfg)
    exported.load_state_dict(weights)
    few = type("Few", (), {"corpus": [task.corpus[i] for i in range(12)]})  # a batch is enough here
    a = pooled_speech_features(load_pretrained(run), few)
    b = pooled_speech_features(exported, few)
    assert a.shape == (12, 128)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the CLI on the export, a second probe from scratch (random-init floor included): the
    # end-of-job result, exactly
    capsys.readouterr()
    assert probe.main([str(hf), "--out", str(tmp_path / "hf.json")]) == 0
    assert re.fullmatch(r"probe: \d\.\d\d accuracy vs \d\.\d\d at random init\n", capsys.readouterr().out)
    first, from_hf = (json.loads(p.read_text()) for p in (run / linear_probe.PROBE_FILE, tmp_path / "hf.json"))
    assert from_hf["kind"] == "hf" and from_hf["test_held_out_of_pretraining"] is None
    for key in ("accuracy", "macro_f1", "val_accuracy", "weight_decay"):
        assert from_hf[key] == first[key], key
    assert from_hf["random_init"] == first["random_init"]  # every init's result, and their mean


@pytest.fixture
def user_task(tmp_path):
    """Two classes of synthetic 'recordings' (a low and a high hum in noise), 16 files of
    1.0-1.3 s at 22.05 kHz (resampled on reading), some of equal length, no split field."""
    import soundfile

    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        label, freq = ("low", 150.0) if i % 2 else ("high", 900.0)
        n = 22050 + 2205 * (i % 4)
        t = np.arange(n) / 22050
        wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(n)
        soundfile.write(tmp_path / f"u{i}.wav", wav.astype(np.float32), 22050)
        rows.append({"audio": f"u{i}.wav", "label": label})
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task


def test_a_user_task_of_recordings_is_probed(speech_run, user_task, tmp_path, capsys):
    from d2v_fast.data.audio.probe_task import read_user_speech_task
    from d2v_fast.pretrained import load_pretrained
    from d2v_fast.modalities.audio import pooled_speech_features

    run, _, _ = speech_run
    assert probe.main([str(run), "--task", str(user_task), "--out", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["classes"] == 2 and sum(res["examples"].values()) == 16 and res["test_held_out_of_pretraining"] is None
    # utterances of different lengths never share a batch: batching does not change the features
    task = read_user_speech_task(user_task)
    assert sorted({len(w) for w in task.corpus}) == [16000, 17600, 19200, 20800]
    enc = load_pretrained(run)
    torch.testing.assert_close(pooled_speech_features(enc, task), pooled_speech_features(enc, task, batch_size=1),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("case, needle", [
    ("no-audio", ":2: no 'audio' field (found 'label', 'path')"),
    ("not-audio", "cannot be decoded as audio"),
    ("one-class", "only the label 'low'; a probe needs at least 2 classes"),
    ("broken-export", "no model.safetensors"),
    ("probe-every", "--train.probe_every 5: speech is probed at the end of the job only"),
])
def test_bad_input_is_one_line_and_exit_2(speech_run, user_task, tmp_path, capsys, case, needle):
    run, hf, _ = speech_run
    rows = [json.loads(l) for l in user_task.read_text().splitlines()]
    task = tmp_path / "bad.jsonl"
    if case in ("no-audio", "not-audio", "one-class"):
        if case == "no-audio":
            rows[1] = {"label": "x", "path": "u1.wav"}
        elif case == "not-audio":
            (user_task.parent / "fake.wav").write_text("not audio")
            rows[3]["audio"] = "fake.wav"
        else:
            rows = [r for r in rows if r["label"] == "low"]
        task.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc = probe.main([str(run), "--task", str(task), "--out", str(tmp_path / "p.json")])
    elif case == "broken-export":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text((hf / "config.json").read_text())
        rc = probe.main([str(broken), "--out", str(tmp_path / "p.json")])
    else:
        rc = pretrain.main(["--modality", "audio", "--config", "tiny", "--train.probe_every", "5",
                            "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "p.json").exists()
