"""Speech recognition: ``Data2VecAudioForCTC`` with a character vocabulary.

The vocabulary is every character of the training transcripts (``normalize_transcript``:
lower case, letters, digits and apostrophes), the word delimiter ``|`` for a space, ``[UNK]``
and ``[PAD]``; ``[PAD]`` (id 0) is the CTC blank, as ``Data2VecAudioForCTC`` takes
``config.pad_token_id`` for the blank. It is saved as a ``Wav2Vec2CTCTokenizer`` with the
export's ``Wav2Vec2FeatureExtractor`` in a ``Wav2Vec2Processor``; training encodes the
transcripts and the audio with that very processor, so what the output directory holds is
what training used.

As in fairseq's data2vec / wav2vec 2.0 CTC fine-tuning (``feature_grad_mult: 0.0`` in its
fine-tuning configs) and Hugging Face's CTC example (``freeze_feature_encoder``), the
convolutional feature encoder is frozen, for the pretrained model and the control alike;
fairseq's other freeze (the transformer for the first updates, ``freeze_finetune_updates``)
is left out: at a few hundred steps it would leave no time to train it.

Two settings are this project's, for the tiny scale (a few hundred steps; docs/finetune.md):
the CTC head (``lm_head``) learns at ``HEAD_LR_MULT`` times ``--lr`` (at one rate for all,
both runs stayed on the all-blank output for 300 steps and more, even on 8 utterances),
and SpecAugment and dropout are off (``TINY_SCALE``: Hugging Face's default time masking,
``mask_time_prob`` 0.05 with ``mask_time_min_masks`` 2 spans of 10 frames, hides ~20% of a
2-second utterance).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError
from . import Job

HEAD_LR_MULT = 10.0
TINY_SCALE = {"mask_time_prob": 0.0, "hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
              "final_dropout": 0.0}  # config overrides, saved with the model (no effect at inference)
BLANK = "[PAD]"
UNK = "[UNK]"
DELIMITER = "|"


def vocabulary(transcripts: list[str]) -> dict[str, int]:
    """{token: id}: the blank/pad first (id 0), then the unknown token, then the characters
    of ``transcripts`` (spaces as the word delimiter), sorted."""
    chars = sorted({c for t in transcripts for c in t.replace(" ", DELIMITER)})
    return {BLANK: 0, UNK: 1, **{c: i + 2 for i, c in enumerate(chars)}}


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus-level CER and WER: edit distances summed over utterances, over the reference
    characters (spaces included) / words."""
    ce = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    we = sum(edit_distance(h.split(), r.split()) for h, r in zip(hypotheses, references))
    return {"cer": ce / max(1, sum(len(r) for r in references)),
            "wer": we / max(1, sum(len(r.split()) for r in references))}


def load_task(task: str | None, progress: bool):
    from ..data.audio import asr_task

    if task is None or str(task) == "builtin":
        # the size is read here, not bound at import, so that tests can use a small task
        return asr_task.read_asr_corpus(asr_task.builtin_asr_task(asr_task.ASR_UTTERANCES, progress=progress)), True
    return asr_task.read_user_asr_task(task), False


def speech_job(base: Path, task: str | None, *, run_config: dict | None, progress: bool, seed: int,
             work: Path) -> Job:
    import torch
    from transformers import (AutoConfig, Data2VecAudioForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                              Wav2Vec2Processor)

    loaded, builtin = load_task(task, progress)
    train_ix, test_ix = loaded.indices("train"), loaded.indices("test")
    vocab = vocabulary([loaded.transcripts[i] for i in train_ix])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        vocab_file = Path(d) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token=UNK, pad_token=BLANK,
                                         word_delimiter_token=DELIMITER, do_lower_case=False,
                                         bos_token=None, eos_token=None)  # CTC targets have none
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise UsageError(f"{base}: no usable preprocessor_config.json ({type(err).__name__}); export the run again "
                         f"(python -m d2v_fast.export RUN_DIR OUT_DIR)") from None
    processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    rate = extractor.sampling_rate
    if tokenizer.get_vocab() != vocab:
        raise RuntimeError(f"the tokenizer's vocabulary differs from the one built: {tokenizer.get_vocab()}")
    config = AutoConfig.from_pretrained(
        base, vocab_size=len(vocab), pad_token_id=tokenizer.pad_token_id, ctc_loss_reduction="mean",
        ctc_zero_infinity=True, architectures=["Data2VecAudioForCTC"], bos_token_id=None, eos_token_id=None,
        **TINY_SCALE)

    def audio(i):
        return np.asarray(loaded.audio[i], dtype=np.float32)

    class Utterances(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, k):
            i = self.rows[k]
            return {"audio": audio(i), "text": loaded.transcripts[i]}

    def collate(items):
        batch = processor.feature_extractor([x["audio"] for x in items], sampling_rate=rate, padding=True,
                                            return_attention_mask=True, return_tensors="pt")
        labels = processor.tokenizer([x["text"] for x in items], padding=True, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].eq(0), -100)
        return dict(batch)

    def evaluate(model, device):
        hyps, refs = [], []
        for start in range(0, len(test_ix), 8):
            rows = test_ix[start:start + 8]
            batch = collate([{"audio": audio(i), "text": loaded.transcripts[i]} for i in rows])
            logits = model(input_values=batch["input_values"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            hyps += processor.batch_decode(logits.argmax(-1).cpu())
            refs += [loaded.transcripts[i] for i in rows]
        return {**error_rates(hyps, refs), "examples": [{"reference": r, "hypothesis": h}
                                                        for r, h in list(zip(refs, hyps))[:3]]}

    held_out = None
    if builtin and run_config is not None:
        from ..modalities.audio import speech_held_out

        held_out = speech_held_out(run_config, loaded)
    seconds = lambda rows: round(sum(len(loaded.audio[i]) for i in rows) / rate, 1)  # noqa: E731
    return Job(modality="audio", pipeline_task="automatic-speech-recognition", model_class=Data2VecAudioForCTC,
               config=config, base=base, train=Utterances(train_ix), collator=collate, evaluate=evaluate,
               metric="cer", higher_is_better=False, save=processor.save_pretrained,
               prepare_model=lambda model: model.freeze_feature_encoder(), held_out=held_out,
               head="lm_head", head_lr_mult=HEAD_LR_MULT,
               task={"source": loaded.source, "examples": {"train": len(train_ix), "test": len(test_ix)},
                     "seconds": {"train": seconds(train_ix), "test": seconds(test_ix)},
                     "vocabulary": list(vocab), "blank_id": tokenizer.pad_token_id,
                     "frozen": "feature encoder (convolutions)", "tested_on": "test split",
                     "head_lr_mult": HEAD_LR_MULT, "config_overrides": TINY_SCALE,
                     "feature_extractor": extractor.to_dict()},
               handles={"processor": processor})
