"""RoBERTa-layout byte-level BPE tokenizers: train, load, save, checksum.

Kept free of torch so corpus-preparation workers start fast.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from ...errors import UsageError

# docs/design.md#hf-layout: <s>=0 <pad>=1 </s>=2 <unk>=3, then <mask> (lstrip=True, like RoBERTa's).
ROBERTA_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
REQUIRED_IDS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
TOKENIZER_FILE = "tokenizer.json"


def _roberta_pipeline(tok):
    """Byte-level pre-tokenizer, decoder and <s> … </s> post-processor, as RoBERTa has."""
    from tokenizers import decoders, pre_tokenizers, processors

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", REQUIRED_IDS["</s>"]), ("<s>", REQUIRED_IDS["<s>"]), True, False)
    return tok


def _special_added_tokens():
    from tokenizers import AddedToken

    return [AddedToken(t, lstrip=(t == "<mask>"), rstrip=False, normalized=False, special=True)
            for t in ROBERTA_TOKENS]


def train_bpe(documents: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = True):
    """Train a byte-level BPE with the RoBERTa special tokens at ids 0..4."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(ROBERTA_TOKENS):
        raise UsageError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{256 + len(ROBERTA_TOKENS)} (256 bytes + {len(ROBERTA_TOKENS)} special tokens)")
    tok = _roberta_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=_special_added_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(documents, trainer=trainer)
    _check_special_ids(tok, "the trained tokenizer")
    return tok


def load_tokenizer(directory: str | Path, *, flag: str = "--tokenizer"):
    """Load a RoBERTa-format tokenizer directory: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``."""
    from tokenizers import Tokenizer, models

    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{flag} {directory}: no such directory; point it at a RoBERTa-format "
                         f"tokenizer directory (tokenizer.json, or vocab.json + merges.txt)")
    tj, vocab, merges = directory / TOKENIZER_FILE, directory / "vocab.json", directory / "merges.txt"
    if tj.is_file():
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise UsageError(f"{tj}: not a valid tokenizer.json ({_first_line(err)}); "
                             f"re-save it with the tokenizers library") from None
    elif vocab.is_file() and merges.is_file():
        try:
            tok = _roberta_pipeline(Tokenizer(models.BPE.from_file(str(vocab), str(merges))))
        except Exception as err:
            raise UsageError(f"{directory}: vocab.json/merges.txt could not be read "
                             f"({_first_line(err)}); check that they are a byte-level BPE pair") from None
        tok.add_special_tokens(_special_added_tokens())
    else:
        raise UsageError(f"{flag} {directory}: holds neither tokenizer.json nor vocab.json + merges.txt; "
                         f"point it at a RoBERTa-format tokenizer directory, or leave it out and "
                         f"train one with --vocab-size N")
    _check_special_ids(tok, f"{flag} {directory}")
    return tok


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _check_special_ids(tok, where: str) -> None:
    for token, want in REQUIRED_IDS.items():
        got = tok.token_to_id(token)
        if got != want:
            raise UsageError(f"{where}: {token!r} has id {got}, expected {want} (RoBERTa layout "
                             f"<s>=0 <pad>=1 </s>=2 <unk>=3); use a RoBERTa-format tokenizer "
                             f"or train one with --vocab-size N")
    if tok.token_to_id("<mask>") is None:
        raise UsageError(f"{where}: has no '<mask>' token; add it or train a tokenizer with --vocab-size N")


def special_ids(tok) -> dict[str, int]:
    ids = {name: tok.token_to_id(t) for name, t in
           zip(("bos", "pad", "eos", "unk", "mask"), ROBERTA_TOKENS)}
    return ids


def save_tokenizer(tok, directory: str | Path, *, model_max_length: int = 512) -> str:
    """Write tokenizer.json (+ vocab.json/merges.txt for BPE) and the transformers config files.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(directory)`` offline.
    Returns the tokenizer checksum (sha256 of tokenizer.json).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / TOKENIZER_FILE))
    try:
        tok.model.save(str(directory))  # vocab.json + merges.txt for BPE models
    except Exception:
        pass  # other model types only need tokenizer.json
    mask = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}
    specials = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": mask}
    config = {"tokenizer_class": "RobertaTokenizer", **specials, "add_prefix_space": False,
              "errors": "replace", "trim_offsets": True, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return tokenizer_checksum(directory)


def tokenizer_checksum(directory: str | Path) -> str:
    return hashlib.sha256((Path(directory) / TOKENIZER_FILE).read_bytes()).hexdigest()
