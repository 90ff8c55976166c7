"""Image classification: ``Data2VecVisionForImageClassification`` on the built-in Fashion-MNIST
photos (train split; tested on the first ``TEST_IMAGES`` t10k photos, which image
pretraining never reads) or on a prepared image corpus with classes (a directory of class
folders is prepared first, at the model's image size).

Every photo is given to the model as its deterministic centre view
(``modalities.images.whole_photos``: the stored photo's centre square resized to the model's
image size, normalised as in pretraining, no augmentation) and the image processor
saved beside the model (``image_processor_dict`` of the task's corpus) does the same to a
raw photo, so the pipeline sees what training saw. The classifier reads the [CLS] token
(the export's ``use_mean_pooling`` is false so that the pretrained final LayerNorm is kept).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UsageError
from . import Job

TEST_IMAGES = 2000   # t10k photos scored (of 10,000): a few seconds per model on 2 CPU cores
BUILTIN_LIMIT = None  # the built-in corpus's size (None: all of it); read per call so tests can shrink it


def open_task_corpus(task: str | None, image_size: int, work: Path, progress: bool):
    """(the corpus, whether it is the built-in one)."""
    from ..data.images.corpus import open_images

    if task is None or str(task) == "builtin":
        from ..data.images.builtin import builtin_images

        return open_images(builtin_images(limit=BUILTIN_LIMIT, progress=progress)), True
    path = Path(task)
    if not path.is_dir():
        raise UsageError(f"--task {path}: not a directory; give a prepared image corpus with classes or a directory "
                         f"of class folders (one folder of images per class), or builtin")
    if not (path / "meta.json").is_file():
        from ..data.images.prepare import prepare_images

        if progress:
            print(f"finetune: preparing the images under {path} at {image_size}x{image_size}", file=sys.stderr, flush=True)
        corpus = prepare_images(work / "images", [str(path)], size=image_size, progress=False)
        return open_images(corpus, flag="--task"), False
    return open_images(path, flag="--task"), False


def images_job(base: Path, task: str | None, *, run_config: dict | None, progress: bool, seed: int,
               work: Path) -> Job:
    import numpy as np
    import torch
    from transformers import AutoConfig, Data2VecVisionForImageClassification

    from ..data.probe_task import split_by_document
    from ..models.vision import config_from_hf
    from ..modalities.images import image_processor_dict, whole_photos

    try:
        enc = config_from_hf(json.loads((base / "config.json").read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{base / 'config.json'}: {err}; not a d2v_fast image model") from None
    corpus, builtin = open_task_corpus(task, enc.image_size, work, progress)
    labels = np.asarray(corpus.labels)
    if not corpus.classes or (labels < 0).any():
        raise UsageError(f"--task {corpus.path}: images without class labels; prepare the corpus from a directory "
                         f"with one folder of images per class")
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        raise UsageError(f"--task {corpus.path}: only the class {corpus.classes[present[0]]!r}; a classifier needs "
                         f"at least 2 classes (one folder of images per class)")
    splits = corpus.meta.get("splits") or {}
    if "train" in splits and "t10k" in splits:
        (a, b), (c, d) = splits["train"], splits["t10k"]
        train_ix, test_ix = list(range(a, b)), list(range(c, min(d, c + TEST_IMAGES)))
        split_note = f"train split; test: the first {len(test_ix)} t10k photos"
    else:
        split = split_by_document(labels.tolist())
        train_ix = [i for i, s in enumerate(split) if s in ("train", "val")]
        test_ix = [i for i, s in enumerate(split) if s == "test"]
        split_note = "80/20 per class (seeded): train, test"
        if not test_ix or not train_ix:
            raise UsageError(f"--task {corpus.path}: too few images per class to hold some out for testing; give "
                             f"at least 3 images of each class")
    classes = list(corpus.classes)
    size = enc.image_size

    def collate(rows):
        return {"pixel_values": whole_photos(corpus, list(rows), size),
                "labels": torch.as_tensor(labels[list(rows)], dtype=torch.long)}

    def evaluate(model, device):
        from ..linear_probe import macro_f1

        preds = []
        for start in range(0, len(test_ix), 256):
            batch = collate(test_ix[start:start + 256])
            preds.append(model(pixel_values=batch["pixel_values"].to(device)).logits.argmax(-1).cpu())
        pred, y = torch.cat(preds), torch.as_tensor(labels[test_ix], dtype=torch.long)
        return {"accuracy": float((pred == y).double().mean()), "macro_f1": macro_f1(pred, y, len(classes))}

    config = AutoConfig.from_pretrained(base, num_labels=len(classes), id2label=dict(enumerate(classes)),
                                        label2id={c: i for i, c in enumerate(classes)},
                                        architectures=["Data2VecVisionForImageClassification"])
    processor = image_processor_dict(enc, corpus.meta)

    def save(directory: Path):
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")

    held_out = None
    if builtin and run_config is not None:
        # image jobs pretrain on a corpus's train split only; the t10k photos are never read
        try:
            from ..data.images.corpus import read_meta

            src = read_meta(Path(run_config["data_dir"])).get("source", {}).get("dataset")
            held_out = True if src == "fashion-mnist" else None
        except (KeyError, TypeError, UsageError):
            held_out = None
    source = "Fashion-MNIST (the built-in photos)" if builtin else str(corpus.path)
    return Job(modality="images", pipeline_task="image-classification",
               model_class=Data2VecVisionForImageClassification, config=config, base=base, train=list(train_ix),
               collator=collate, evaluate=evaluate, metric="accuracy", higher_is_better=True, save=save,
               held_out=held_out,
               task={"source": source, "corpus": str(corpus.path), "classes": len(classes), "class_names": classes,
                     "examples": {"train": len(train_ix), "test": len(test_ix)}, "splits": split_note,
                     "image_size": size})
