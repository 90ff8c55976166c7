"""Hugging Face interop for text: the ``Data2VecTextModel`` directory an export writes (config,
weights with a fresh pooler, the corpus's tokenizer) and the ``Data2VecTextModel`` /
``RobertaModel`` directories a warm start or the probe reads; see docs/text.md."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import UsageError
from .models.encoder import EncoderConfig


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _run_dir(ckpt_dir: Path) -> Path:
    return ckpt_dir.parent.parent


def find_tokenizer(ckpt_dir: Path, state: dict) -> Path | None:
    candidates = [_run_dir(ckpt_dir) / "tokenizer"]
    data = state.get("data_dir") or state.get("config", {}).get("data", {}).get("path")
    if data:
        candidates.append(Path(data) / "tokenizer")
    return next((c for c in candidates if (c / "tokenizer.json").is_file()), None)


def hf_config(enc: dict, dtype: str) -> dict:
    return {
        "architectures": ["Data2VecTextModel"],
        "model_type": "data2vec-text",
        "vocab_size": int(enc["vocab_size"]),
        "hidden_size": int(enc["hidden_size"]),
        "num_hidden_layers": int(enc["num_layers"]),
        "num_attention_heads": int(enc["num_heads"]),
        "intermediate_size": int(enc["ffn_size"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": float(enc["dropout"]),
        "attention_probs_dropout_prob": float(enc["attention_dropout"]),
        "max_position_embeddings": int(enc["max_seq_len"]) + int(enc["pad_id"]) + 1,
        "type_vocab_size": 1,
        "initializer_range": float(enc["init_std"]),
        "layer_norm_eps": float(enc["layer_norm_eps"]),
        "pad_token_id": int(enc["pad_id"]),
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
        "use_cache": True,
        "classifier_dropout": None,
        "dtype": dtype,
    }


def _pooler(hidden: int, std: float) -> dict[str, torch.Tensor]:
    # Pretraining has no pooler; a fixed seed makes repeated exports identical.
    g = torch.Generator().manual_seed(0)
    return {"pooler.dense.weight": torch.randn(hidden, hidden, generator=g) * std,
            "pooler.dense.bias": torch.zeros(hidden)}


def write_text_hf_dir(tensors: dict[str, torch.Tensor], enc: dict, out: Path, *, dtype: str, run_dir: Path,
                      state: dict) -> None:
    """``Data2VecTextModel`` directory: weights (with a fresh pooler), config and tokenizer."""
    from safetensors.torch import save_file

    from .files import staged_directory

    ckpt_dir = state["_checkpoint_dir"]
    tensors = dict(tensors)
    tensors.update(_pooler(enc["hidden_size"], enc["init_std"]))
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in sorted(tensors.items())}
    tok = find_tokenizer(ckpt_dir, state)
    if tok is None:
        raise UsageError(f"{ckpt_dir}: no tokenizer found (looked in {run_dir / 'tokenizer'}); "
                         f"copy the corpus's tokenizer/ directory there")
    with staged_directory(out) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config(enc, dtype), indent=2) + "\n")
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy2(f, staging / f.name)
        tc = staging / "tokenizer_config.json"
        if tc.is_file():
            conf = json.loads(tc.read_text())
            conf["model_max_length"] = int(enc["max_seq_len"])
            tc.write_text(json.dumps(conf, indent=2) + "\n")
        (staging / "d2v_fast.json").write_text(json.dumps(
            {"checkpoint": str(ckpt_dir.resolve()), "step": state.get("step"), "weights": state["_weights"]},
            indent=2) + "\n")


_PREFIXES = ("roberta.", "data2vec_text.", "model.")


def read_hf_model(path: str | os.PathLike, *, flag: str = "--init-from") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, encoder weights under our names) of a local Data2VecTextModel/RobertaModel dir."""
    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise UsageError(f"{flag} {path}: {what}; give a local Hugging Face model directory")
    if (path / ckpt.CKPT_DIR).is_dir() or (path / ckpt.ENCODER_META).is_file() or (path / ckpt.STATE_FILE).is_file():
        raise UsageError(f"{flag} {path}: a d2v_fast run or checkpoint, not a Hugging Face model directory; export "
                         f"it first (python -m d2v_fast.export {path} HF_DIR) and give HF_DIR")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {path}: no config.json; give a Hugging Face model directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{flag} {path / 'config.json'}: not valid JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{flag} {path / 'config.json'}: not a JSON object; give a Hugging Face model directory")
    if config.get("model_type") not in ("data2vec-text", "roberta"):
        raise UsageError(f"{flag} {path}: model_type {config.get('model_type')!r}; expected data2vec-text or roberta")
    fix = "give a complete Hugging Face model directory"
    if (path / "model.safetensors").is_file():
        raw = ckpt.read_safetensors(path / "model.safetensors", fix)
    elif (path / "pytorch_model.bin").is_file():
        raw = ckpt.load_plain(path / "pytorch_model.bin", fix)  # weights_only: a crafted pickle runs nothing
    else:
        raise UsageError(f"{flag} {path}: no model.safetensors or pytorch_model.bin")
    weights = {}
    for k, v in raw.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k.startswith(("embeddings.", "encoder.layer.")) and isinstance(v, torch.Tensor):
            weights[k] = v
    return config, weights


def check_hf_fits(config: dict, enc: EncoderConfig, path, *, flag: str = "--init-from") -> None:
    pairs = [("vocab_size", "vocab_size", "the corpus vocabulary"),
             ("hidden_size", "hidden_size", "--model.hidden_size"),
             ("num_hidden_layers", "num_layers", "--model.num_layers"),
             ("num_attention_heads", "num_heads", "--model.num_heads"),
             ("intermediate_size", "ffn_size", "--model.ffn_size")]
    for theirs, ours, fix in pairs:
        if int(config.get(theirs, -1)) != getattr(enc, ours):
            raise UsageError(f"{flag} {path}: {theirs} is {config.get(theirs)}, this run has "
                             f"{getattr(enc, ours)} ({fix}); the sizes must match")
    if int(config.get("max_position_embeddings", -1)) != enc.max_positions:
        raise UsageError(f"{flag} {path}: max_position_embeddings is {config.get('max_position_embeddings')}, this "
                         f"run has {enc.max_positions}; set --model.max_seq_len "
                         f"{int(config.get('max_position_embeddings', 0)) - enc.pad_id - 1}")
