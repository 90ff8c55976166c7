"""Hugging Face interop: export (to ``Data2VecTextModel`` for text; each modality writes its
own model class), text warm starts, ``load_pretrained``.

    python -m d2v_fast.export CHECKPOINT OUT_DIR [--weights student|teacher] [--dtype float32|bfloat16]

``CHECKPOINT`` is a run directory (its newest complete checkpoint is used), a checkpoint
directory or a file in one. Only the checkpoint's ``model.safetensors`` and ``config.json``
are read, checked against the recorded checksum and the encoder config; nothing in them
runs. For text the output holds ``config.json``, ``model.safetensors`` with exactly the base-model
keys (pooler included, freshly initialised: pretraining has none) and the tokenizer files,
and loads offline with ``Data2VecTextModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``. Needs only safetensors and tokenizers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import UsageError, cli_entry
from .models.encoder import EncoderConfig

_STUDENT = "student.encoder."
_TEACHER = "teacher."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- finding things
def resolve_checkpoint(path: str | os.PathLike, *, flag: str = "CHECKPOINT") -> Path:
    """A checkpoint directory (holding state.pt) from a run dir, checkpoint dir or a file in one."""
    path = Path(path)
    if path.is_file() and path.name in (ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.META_FILE) \
            and (path.parent / ckpt.STATE_FILE).is_file():
        return path.parent
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file or directory; give a run directory or a checkpoint")
    if path.is_dir() and (path / "state.pt").is_file():
        if path.name.endswith(".partial"):
            raise UsageError(f"{flag} {path}: an incomplete checkpoint (its write never finished); "
                             f"give the run directory to use its newest complete checkpoint")
        return path
    if path.is_dir():
        latest = ckpt.latest_checkpoint(path)
        if latest is not None:
            return latest
        partial = list(ckpt.checkpoint_root(path).glob(".*.partial")) if ckpt.checkpoint_root(path).is_dir() else []
        what = "only an incomplete checkpoint" if partial else "no checkpoint"
        raise UsageError(f"{flag} {path}: holds {what}; train longer (checkpoints are written every "
                         f"--train.ckpt_every steps and at the end) or give another run directory")
    raise UsageError(f"{flag} {path}: not a run directory or checkpoint")


def modality_of(state_or_config: dict):
    """The modality a checkpoint's state (or its saved config) was trained on; older runs are text."""
    from .modalities import get_modality

    config = state_or_config.get("config", state_or_config) if isinstance(state_or_config, dict) else {}
    return get_modality((config or {}).get("modality", "text"), flag="config.json modality")


def _load_state(ckpt_dir: Path) -> dict:
    """The checkpoint's config.json fields and its weights (``model``); state.pt is not needed."""
    state = ckpt.load_checkpoint(ckpt_dir, train_state=False)
    modality = modality_of(state)
    expected = _encoder_spec(state["encoder_config"], ckpt_dir / ckpt.META_FILE, modality)
    fix = f"use an earlier checkpoint than {ckpt_dir.name}"
    ckpt.check_tensors(ckpt.tensor_spec(encoder_weights(state, "student")), expected, ckpt_dir / ckpt.MODEL_FILE, fix)
    ckpt.check_tensors(ckpt.tensor_spec(encoder_weights(state, "teacher")), expected, ckpt_dir / ckpt.MODEL_FILE, fix)
    return state


def _encoder_spec(encoder_config: dict, where, modality=None) -> dict:
    """{name: (shape, dtype)} of the encoder that ``encoder_config`` describes, built on the meta
    device so that a config with absurd sizes costs no memory before it is refused."""
    if modality is None:
        from .modalities import get_modality

        modality = get_modality("text")
    try:
        cfg = modality.encoder_config_from_dict(encoder_config)
        with torch.device("meta"):
            model = modality.build_encoder(cfg)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UsageError(f"{where}: its encoder_config does not describe an encoder ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the file is damaged or was edited") from None
    return ckpt.tensor_spec(model.state_dict())


def encoder_weights(state: dict, which: str = "student") -> dict[str, torch.Tensor]:
    """Encoder parameters under Hugging Face names: the student's, or the teacher's averaged
    weights completed by what the modality's teacher shares with the student."""
    model = state["model"]
    student = {k[len(_STUDENT):]: v for k, v in model.items() if k.startswith(_STUDENT)}
    if which == "student":
        return student
    teacher = {k[len(_TEACHER):]: v for k, v in model.items() if k.startswith(_TEACHER)}
    return modality_of(state).teacher_encoder_weights(student, teacher)


def _run_dir(ckpt_dir: Path) -> Path:
    return ckpt_dir.parent.parent


def find_tokenizer(ckpt_dir: Path, state: dict) -> Path | None:
    candidates = [_run_dir(ckpt_dir) / "tokenizer"]
    data = state.get("data_dir") or state.get("config", {}).get("data", {}).get("path")
    if data:
        candidates.append(Path(data) / "tokenizer")
    return next((c for c in candidates if (c / "tokenizer.json").is_file()), None)


# ----------------------------------------------------------------------------- export
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


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, weights: str = "student",
           dtype: str = "float32") -> Path:
    """Write the checkpoint's encoder as a Hugging Face model directory of its modality."""
    if weights not in ("student", "teacher"):
        raise UsageError(f"--weights {weights!r}: expected student or teacher")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    ckpt_dir = resolve_checkpoint(checkpoint)
    state = _load_state(ckpt_dir)
    tensors = encoder_weights(state, weights)
    state = dict(state, _checkpoint_dir=ckpt_dir, _weights=weights)
    out = Path(out_dir)
    modality_of(state).export_hf(tensors, state["encoder_config"], out, dtype=dtype, run_dir=_run_dir(ckpt_dir),
                                 state=state)
    return out


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


# ----------------------------------------------------------------------------- warm start
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


# ----------------------------------------------------------------------------- load_pretrained
def load_pretrained(path, map_location="cpu") -> torch.nn.Module:
    """The student encoder of a run directory (its encoder.safetensors, else its newest complete
    checkpoint), a checkpoint directory, or an encoder.safetensors / encoder.json file. Every file
    is checked (format version, checksum, keys, shapes, dtypes) and none can run code."""
    path = Path(path)
    if path.is_dir() and (path / ckpt.ENCODER_META).is_file():
        meta = path / ckpt.ENCODER_META
    elif path.is_dir() and (path / ckpt.LEGACY_ENCODER).is_file():
        raise UsageError(f"load_pretrained {path}: its {ckpt.LEGACY_ENCODER} is in the older pickle format, which "
                         f"d2v_fast no longer opens (a pickle can run code when loaded); convert the run once (the "
                         f"conversion reads only tensors and plain values): "
                         f"python -m d2v_fast.checkpoint convert {path}")
    elif path.is_file() and path.suffix in (".safetensors", ".json") and path.parent.joinpath(
            path.stem + ".json").is_file() and path.name not in (ckpt.MODEL_FILE, ckpt.META_FILE):
        meta = path.with_suffix(".json")
    elif path.is_file() and path.name not in (ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.META_FILE):
        raise UsageError(f"load_pretrained {path}: not a d2v_fast encoder (encoder.safetensors + encoder.json) or "
                         f"checkpoint; d2v_fast opens no pickle files (they can run code); an encoder.pt of an older "
                         f"d2v_fast converts once with: python -m d2v_fast.checkpoint convert {path}")
    else:
        meta = None
    if meta is not None:
        try:
            name = json.loads(meta.read_text()).get("modality", "text")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            name = "text"  # read_encoder below reports what is wrong with the file
        from .modalities import get_modality

        modality = get_modality(name if isinstance(name, str) else "text", flag=f"{meta} modality")
        cfg, weights = ckpt.read_encoder(meta, lambda c, where: _encoder_spec(c, where, modality))
    else:
        ckpt_dir = resolve_checkpoint(path, flag="load_pretrained")
        state = ckpt.load_checkpoint(ckpt_dir, train_state=False)
        modality = modality_of(state)
        cfg, weights = state["encoder_config"], encoder_weights(state, "student")
        ckpt.check_tensors(ckpt.tensor_spec(weights), _encoder_spec(cfg, ckpt_dir / ckpt.META_FILE, modality),
                           ckpt_dir / ckpt.MODEL_FILE, f"use an earlier checkpoint than {ckpt_dir.name}")
    model = modality.build_encoder(modality.encoder_config_from_dict(cfg))
    model.load_state_dict(weights)
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from .config import _Parser

    p = _Parser(prog="python -m d2v_fast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory, checkpoint directory or state.pt")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the Hugging Face model into")
    p.add_argument("--weights", choices=("student", "teacher"), default="student")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = export(args.checkpoint, args.out_dir, weights=args.weights, dtype=args.dtype)
    cls = json.loads((out / "config.json").read_text()).get("architectures", ["Data2VecTextModel"])[0]
    print(f"exported {args.weights} weights ({args.dtype}) to {out}; load with "
          f"transformers.{cls}.from_pretrained({str(out)!r})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
