"""Fine-tuning (``python -m d2v_fast.finetune``): for every modality, a few steps on a handful
of examples end to end (the output directory loads with ``from_pretrained`` and runs in its
``pipeline``; ``finetune.json``; the control is the same architecture with fresh weights),
the speech vocabulary / blank / feature extractor saved being the ones trained with, the
built-in speech task's hold-out from pretraining, and bad input."""
import json
import os

import numpy as np
import pytest
import torch

from d2v_fast import finetune
from d2v_fast.finetune import RESULT_FILE

from .helpers import small_cfg

transformers = pytest.importorskip("transformers")

STEPS = ["--max-steps", "2", "--batch-size", "4"]
WORDS = ["one two three", "red green blue", "open the file", "close the door", "read a line", "write the data",
         "the quick fox", "a lazy dog", "stop the clock", "start again"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_output(out, pipeline_task, model_class, result):
    """The directory loads with from_pretrained, runs in its pipeline, and finetune.json says
    both runs trained the same architecture."""
    assert json.loads((out / RESULT_FILE).read_text()) == json.loads(json.dumps(result))
    assert result["pretrained"]["architecture"] == result["scratch"]["architecture"] == model_class.__name__
    assert result["pretrained"]["parameters"] == result["scratch"]["parameters"] > 0
    assert result["steps"] == 2 and result["batch_size"] == 4 and result["seeds"]["scratch_init"] == 0
    assert result["value"] == result["pretrained"][result["metric"]]
    assert result["scratch_value"] == result["scratch"][result["metric"]]
    assert result["host"]["cpu_seconds"] > 0 and result["pretrained"]["train_cpu_seconds"] > 0
    model = model_class.from_pretrained(out)
    assert type(model).__name__ == model_class.__name__
    assert not list(out.parent.glob(f".{out.name}.partial*"))  # written atomically
    return transformers.pipeline(pipeline_task, model=str(out), device="cpu")


def check_control(job):
    """The control is ``job.model_class`` from the same config: same parameter names and
    shapes as the pretrained model, none of its encoder weights loaded."""
    pre = finetune.pretrained_model(job, 0).state_dict()
    fresh = finetune.fresh_model(job, 0).state_dict()
    assert {k: v.shape for k, v in pre.items()} == {k: v.shape for k, v in fresh.items()}
    base = transformers.AutoModel.from_pretrained(job.base).state_dict()
    loaded = [k for k in pre if any(k.endswith(b) and torch.equal(pre[k], v) for b, v in base.items()
                                    if v.dim() == 2 and v.std() > 0)]  # constant inits (zeros) say nothing
    assert loaded, "the pretrained model holds the exported weights"
    assert not any(torch.equal(fresh[k], pre[k]) for k in loaded), "the control starts from fresh weights"


# ----------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def text_run(builtin_cache, tmp_path_factory):
    """A 1-step text run (it writes a checkpoint at the end) and a small 3-class task."""
    from d2v_fast.data.text import builtin
    from d2v_fast.data.text.corpus import open_corpus
    from d2v_fast.data.text.probe_task import read_task
    from d2v_fast.trainer import Trainer

    tmp = tmp_path_factory.mktemp("finetune_text")
    cfg = small_cfg(builtin_cache, max_steps=1)
    cfg.model.max_seq_len = 64
    Trainer(cfg, open_corpus(builtin_cache), tmp / "run").fit()
    task = read_task(builtin_cache / builtin.PROBE_TASK_FILE)
    rows, per = [], {}
    for text, label in zip(task.texts, task.labels):
        if label < 3 and per.get(label, 0) < 8:
            per[label] = per.get(label, 0) + 1
            rows.append({"text": text, "label": task.classes[label]})
    return tmp / "run", write_jsonl(tmp / "task.jsonl", rows)


def test_text_run_finetunes_to_a_pipeline_model(text_run, tmp_path, capsys):
    run, task = text_run
    out = tmp_path / "cls"
    assert finetune.main([str(run), "--task", str(task), "--out", str(out), *STEPS]) == 0
    line = capsys.readouterr().out.strip()
    result = json.loads((out / RESULT_FILE).read_text())
    assert line.startswith(f"finetune: {result['value']:.2f} vs {result['scratch_value']:.2f} from scratch")
    assert result["kind"] == "run" and result["modality"] == "text" and result["metric"] == "accuracy"
    assert result["task"]["classes"] == 3 and sum(result["task"]["examples"].values()) == 24
    pipe = check_output(out, "text-classification", transformers.Data2VecTextForSequenceClassification, result)
    pred = pipe("Return a new datetime object.")
    assert pred[0]["label"] in result["task"]["class_names"]
    from d2v_fast import export

    assert export.main([str(run), str(tmp_path / "hf")]) == 0
    job = finetune.build_job("text", tmp_path / "hf", str(task), run_config=None, progress=False, seed=0,
                             work=tmp_path)
    check_control(job)


# ----------------------------------------------------------------------------- speech
@pytest.fixture(scope="module")
def speech_model(tmp_path_factory):
    """A tiny randomly initialised Data2VecAudioModel export and a 10-utterance task of
    eSpeak NG recordings (wav files) with their transcripts."""
    import soundfile as sf

    from d2v_fast.data.audio.builtin import Espeak
    from d2v_fast.models.audio import AudioEncoder, audio_config, save_hf_dir

    tmp = tmp_path_factory.mktemp("finetune_speech")
    torch.manual_seed(0)
    cfg = audio_config("tiny")
    save_hf_dir(AudioEncoder(cfg).state_dict(), cfg, tmp / "hf")
    engine = Espeak.get()
    rows = []
    for i, text in enumerate(WORDS):
        sf.write(tmp / f"u{i}.wav", engine.synthesize(text), engine.sample_rate)
        rows.append({"audio": f"u{i}.wav", "text": text.upper() + "."})
    return tmp / "hf", write_jsonl(tmp / "asr.jsonl", rows)


def test_speech_finetunes_to_an_asr_pipeline_with_the_training_vocabulary(speech_model, tmp_path, capsys):
    hf, task = speech_model
    out = tmp_path / "asr"
    assert finetune.main([str(hf), "--task", str(task), "--out", str(out), *STEPS]) == 0
    line = capsys.readouterr().out.strip()
    result = json.loads((out / RESULT_FILE).read_text())
    assert line.startswith("finetune: ") and "from scratch (CER, lower is better; WER " in line
    assert result["metric"] == "cer" and not result["higher_is_better"] and result["kind"] == "hf"
    assert result["task"]["examples"] == {"train": 8, "test": 2}  # every fifth line is test
    assert 0 <= result["pretrained"]["cer"] and 0 <= result["scratch"]["wer"]
    pipe = check_output(out, "automatic-speech-recognition", transformers.Data2VecAudioForCTC, result)
    assert isinstance(pipe(np.zeros(16000, dtype=np.float32))["text"], str)

    # what was saved is what training used
    job = finetune.build_job("audio", hf, str(task), run_config=None, progress=False, seed=0, work=tmp_path)
    trained = job.handles["processor"]
    saved = transformers.Wav2Vec2Processor.from_pretrained(out)
    config = transformers.AutoConfig.from_pretrained(out)
    vocab = saved.tokenizer.get_vocab()
    assert vocab == trained.tokenizer.get_vocab() and list(vocab) == result["task"]["vocabulary"]
    train_texts = [t for i, t in enumerate(WORDS) if i % 5]  # every fifth line is test
    assert list(vocab) == ["[PAD]", "[UNK]", *sorted(set("|".join(train_texts).replace(" ", "|")))]
    blank = result["task"]["blank_id"]
    assert blank == vocab["[PAD]"] == saved.tokenizer.pad_token_id == config.pad_token_id == job.config.pad_token_id
    assert config.vocab_size == len(vocab) == job.config.vocab_size
    batch = job.collator([job.train[0], job.train[1]])
    ids = saved.tokenizer(train_texts[:2]).input_ids
    for row, want in zip(batch["labels"], ids):
        assert row[row != -100].tolist() == want and blank not in want  # the blank is never a target
    fe_saved, fe_trained = saved.feature_extractor.to_dict(), trained.feature_extractor.to_dict()
    assert fe_saved == fe_trained == {**result["task"]["feature_extractor"]}
    assert fe_saved["sampling_rate"] == 16000 and fe_saved["do_normalize"] and fe_saved["return_attention_mask"]
    x = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 3 + 1
    assert np.allclose(saved.feature_extractor(x, sampling_rate=16000).input_values[0],
                       trained.feature_extractor(x, sampling_rate=16000).input_values[0])
    # the feature encoder is frozen, in both runs alike
    model = finetune.pretrained_model(job, 0)
    assert not any(p.requires_grad for p in model.data2vec_audio.feature_extractor.parameters())
    assert not any(p.requires_grad for p in finetune.fresh_model(job, 0).data2vec_audio.feature_extractor.parameters())
    # no time masking (saved as trained); the CTC head learns at HEAD_LR_MULT times the rate,
    # the rest at the rate, in the Trainer's weight-decay groups
    from d2v_fast.finetune.speech import HEAD_LR_MULT

    assert config.mask_time_prob == job.config.mask_time_prob == 0 and result["task"]["head_lr_mult"] == HEAD_LR_MULT
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), learning_rate=1e-3, weight_decay=0.01,
                                          report_to="none", use_cpu=True)
    opt = finetune._trainer_class(job)(model=model, args=args, train_dataset=job.train).create_optimizer()
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(group) == len(trained) and HEAD_LR_MULT > 1
    for n, p in trained:
        g = group[id(p)]
        assert g["lr"] == pytest.approx(1e-3 * (HEAD_LR_MULT if n.startswith("lm_head.") else 1)), n
    assert group[id(model.lm_head.weight)]["weight_decay"] == 0.01 and group[id(model.lm_head.bias)]["weight_decay"] == 0
    check_control(job)


def test_builtin_speech_task_is_held_out_of_every_builtin_pretraining_corpus(tmp_path, monkeypatch):
    """The task's texts come from the reserved modules only: none is in the texts of the
    largest built-in speech corpus, and the built task records them with their splits."""
    from d2v_fast.data.text import builtin as text_builtin
    from d2v_fast.data.audio import asr_task
    from d2v_fast.data.audio import builtin as speech_builtin

    docs = list(text_builtin.stdlib_labelled_docstrings(2))  # read once, for both sides
    monkeypatch.setattr(asr_task, "stdlib_labelled_docstrings", lambda *a, **k: iter(docs))
    monkeypatch.setattr(speech_builtin, "stdlib_labelled_docstrings", lambda *a, **k: iter(docs))
    monkeypatch.setenv("D2V_FAST_CACHE", str(tmp_path))
    texts, available = asr_task.asr_texts(400)
    pretraining = set(speech_builtin.speech_texts(available))  # the largest built-in corpus's passages
    reserved = {c for module, doc in docs if module >= speech_builtin.RESERVED_FROM
                for c in speech_builtin.speakable_chunks(doc)}
    assert reserved & pretraining, "some passages recur in several modules: the check below can fail"
    # a few passages (licence notices) recur within the reserved modules: at most 5% repeats
    assert len(set(texts)) >= 380 and available > 5000
    unseen = reserved - pretraining
    assert all(any(t in passage for passage in unseen) for t in texts)  # cut from passages pretraining never reads
    with pytest.raises(Exception, match="only"):
        speech_builtin.speech_texts(available + 1)  # no corpus reaches past the reserved modules
    path = asr_task.builtin_asr_task(10, workers=1, progress=False)
    task = asr_task.read_asr_corpus(path)
    assert task.splits.count("test") == 2 and len(task.transcripts) == 10
    assert set(task.transcripts) <= {asr_task.normalize_transcript(t) for t in asr_task.asr_texts(10)[0]}
    assert task.record["pretraining_texts_available"] == available
    voices = [asr_task.asr_voice(i) for i in range(50)]  # one voice, seeded rates and pitches
    assert {v["voice"] for v in voices} == {asr_task.ASR_VOICE} and len({v["rate"] for v in voices}) > 5
    assert voices == [asr_task.asr_voice(i) for i in range(50)]
    from d2v_fast.modalities.audio import speech_held_out

    small = speech_builtin.builtin_speech_corpus(3, workers=1, progress=False)
    assert speech_held_out({"data_dir": str(small)}, task) is True


# ----------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    """A tiny randomly initialised Data2VecVisionModel export and a 60-photo built-in corpus."""
    from d2v_fast.data.images.builtin import builtin_images
    from d2v_fast.modalities.images import ENCODER_PRESETS, IMAGES
    from d2v_fast.models.vision import VisionConfig, VisionEncoder

    tmp = tmp_path_factory.mktemp("finetune_images")
    old = os.environ.get("D2V_FAST_CACHE")
    os.environ["D2V_FAST_CACHE"] = str(tmp / "cache")
    try:
        builtin_images(limit=60, progress=False)
    finally:
        if old is None:
            os.environ.pop("D2V_FAST_CACHE", None)
        else:
            os.environ["D2V_FAST_CACHE"] = old
    torch.manual_seed(0)
    cfg = VisionConfig(**ENCODER_PRESETS["tiny"])
    IMAGES.export_hf(VisionEncoder(cfg).state_dict(), dict(cfg.__dict__), tmp / "hf")
    return tmp / "hf", tmp / "cache"


def test_images_finetune_on_builtin_photos_to_a_pipeline_model(image_model, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from d2v_fast.finetune import images as ft_images

    hf, cache = image_model
    monkeypatch.setenv("D2V_FAST_CACHE", str(cache))
    monkeypatch.setattr(ft_images, "BUILTIN_LIMIT", 60)
    out = tmp_path / "cls"
    assert finetune.main([str(hf), "--out", str(out), *STEPS]) == 0
    assert "from scratch (accuracy)" in capsys.readouterr().out
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["task"]["examples"] == {"train": 60, "test": 10} and result["task"]["classes"] == 10
    pipe = check_output(out, "image-classification", transformers.Data2VecVisionForImageClassification, result)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8))
    assert pipe(photo)[0]["label"] in result["task"]["class_names"]
    # the saved image processor makes from a raw photo what training fed the model
    from d2v_fast.data.images.builtin import load_fashion_mnist
    from d2v_fast.data.images.corpus import open_images
    from d2v_fast.modalities.images import whole_photos

    corpus = open_images(result["task"]["corpus"])
    raw = load_fashion_mnist()[0][60000]  # the first t10k photo, the corpus's image 60
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    got = proc(Image.fromarray(raw), return_tensors="pt")["pixel_values"]
    assert torch.allclose(got, whole_photos(corpus, [60], 32), atol=1e-5)
    job = finetune.build_job("images", hf, None, run_config=None, progress=False, seed=0, work=tmp_path)
    check_control(job)


# ----------------------------------------------------------------------------- bad input
def _photo_dirs(root, classes, bad=False):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    if bad:
        (root / classes[0] / "broken.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("case", ["not-a-model", "export-without-tokenizer", "text-missing-field", "text-csv-missing-column", "text-one-class",
                                  "speech-unreadable-audio", "speech-empty-transcript", "images-unreadable",
                                  "images-one-class"])
def test_bad_input_is_one_line_naming_the_file_and_exit_2(case, speech_model, image_model, tmp_path, capsys):
    hf_audio, asr = speech_model
    hf_images, _ = image_model
    text_hf = tmp_path / "text-hf"
    text_hf.mkdir()
    (text_hf / "config.json").write_text(json.dumps({"model_type": "data2vec-text"}))
    if case == "not-a-model":
        model, task, want = tmp_path, None, f"RUN_OR_EXPORT {tmp_path}: neither a run directory"
    elif case == "export-without-tokenizer":
        model, task = text_hf, write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": str(i % 2)} for i in range(10)])
        want = f"{text_hf}: no usable tokenizer"
    elif case == "text-missing-field":
        model, task, want = text_hf, write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), "t.jsonl:1: no 'label'"
    elif case == "text-csv-missing-column":
        (tmp_path / "t.csv").write_text("sentence,label\nhello,a\n")
        model, task, want = text_hf, tmp_path / "t.csv", "t.csv: the header row has no 'text' column"
    elif case == "text-one-class":
        model, task = text_hf, write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}] * 5)
        want = "only the label 'x'; a classifier needs at least 2 classes"
    elif case == "speech-unreadable-audio":
        (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
        model, task = hf_audio, write_jsonl(tmp_path / "a.jsonl", [{"audio": "bad.wav", "text": "hello"}])
        want = "bad.wav: cannot be decoded as audio"
    elif case == "speech-empty-transcript":
        model, task = hf_audio, write_jsonl(tmp_path / "a.jsonl", [{"audio": str(asr.parent / "u0.wav"), "text": " ?! "}])
        want = "a.jsonl:1: 'text' ' ?! ' is empty"
    elif case == "images-one-class":
        model, task, want = hf_images, _photo_dirs(tmp_path / "photos", ["cat"]), "only the class 'cat'"
    else:
        model, task = hf_images, _photo_dirs(tmp_path / "photos", ["cat", "dog"], bad=True)
        want = "broken.png: not an image Pillow can read"
    args = [str(model), "--out", str(tmp_path / "out")] + (["--task", str(task)] if task else [])
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and want in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
