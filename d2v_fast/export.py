"""Hugging Face interop: export to ``Data2VecTextModel``, warm starts, ``load_pretrained``.

    python -m d2v_fast.export CHECKPOINT OUT_DIR [--weights student|teacher] [--dtype float32|bfloat16]

``CHECKPOINT`` is a run directory (its newest complete checkpoint is used), a checkpoint
directory or its ``state.pt``. The output holds ``config.json``, ``model.safetensors`` with
exactly the base-model keys (pooler included, freshly initialised: pretraining has none)
and the tokenizer files, and loads offline with ``Data2VecTextModel.from_pretrained`` and
``AutoTokenizer.from_pretrained``. Needs only safetensors and tokenizers.
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
from .models.encoder import Encoder, EncoderConfig

_STUDENT = "student.encoder."
_TEACHER = "teacher."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- finding things
def resolve_checkpoint(path: str | os.PathLike, *, flag: str = "CHECKPOINT") -> Path:
    """A checkpoint directory (holding state.pt) from a run dir, checkpoint dir or state.pt."""
    path = Path(path)
    if path.is_file() and path.name == "state.pt":
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


def _load_state(ckpt_dir: Path) -> dict:
    try:
        return torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
    except Exception as err:
        raise UsageError(f"{ckpt_dir / 'state.pt'}: unreadable ({type(err).__name__}); the checkpoint is "
                         f"damaged, use an earlier one") from None


def encoder_weights(state: dict, which: str = "student") -> dict[str, torch.Tensor]:
    """Encoder parameters under Hugging Face names; the teacher shares the student's embeddings."""
    model = state["model"]
    student = {k[len(_STUDENT):]: v for k, v in model.items() if k.startswith(_STUDENT)}
    if which == "student":
        return student
    out = {k: v for k, v in student.items() if k.startswith("embeddings.")}
    out.update({f"encoder.layer.{k[len(_TEACHER):]}": v for k, v in model.items() if k.startswith(_TEACHER)})
    return out


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
    from safetensors.torch import save_file

    if weights not in ("student", "teacher"):
        raise UsageError(f"--weights {weights!r}: expected student or teacher")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    ckpt_dir = resolve_checkpoint(checkpoint)
    state = _load_state(ckpt_dir)
    enc = state["encoder_config"]
    tensors = encoder_weights(state, weights)
    tensors.update(_pooler(enc["hidden_size"], enc["init_std"]))
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in sorted(tensors.items())}
    tok = find_tokenizer(ckpt_dir, state)
    if tok is None:
        raise UsageError(f"{ckpt_dir}: no tokenizer found (looked in {_run_dir(ckpt_dir) / 'tokenizer'}); "
                         f"copy the corpus's tokenizer/ directory there")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out}: exists and is not a directory")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
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
            {"checkpoint": str(ckpt_dir.resolve()), "step": state.get("step"), "weights": weights}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- warm start
_PREFIXES = ("roberta.", "data2vec_text.", "model.")


def read_hf_model(path: str | os.PathLike, *, flag: str = "--init-from") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, encoder weights under our names) of a local Data2VecTextModel/RobertaModel dir."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: no such directory; give a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {path}: no config.json; give a Hugging Face model directory")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in ("data2vec-text", "roberta"):
        raise UsageError(f"{flag} {path}: model_type {config.get('model_type')!r}; expected data2vec-text or roberta")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UsageError(f"{flag} {path}: no model.safetensors or pytorch_model.bin")
    weights = {}
    for k, v in raw.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k.startswith(("embeddings.", "encoder.layer.")):
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
def load_pretrained(path, map_location="cpu") -> Encoder:
    path = Path(path)
    if path.is_dir() and (path / "encoder.pt").is_file():
        f = path / "encoder.pt"
    elif path.is_file() and path.name != "state.pt":
        f = path
    else:
        f = resolve_checkpoint(path, flag="load_pretrained") / "state.pt"
    try:
        obj = torch.load(f, map_location=map_location, weights_only=False)
    except Exception as err:
        raise UsageError(f"{f}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and obj.get("format") == "d2v_fast.encoder":
        cfg, state = obj["encoder_config"], obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and "encoder_config" in obj:
        cfg, state = obj["encoder_config"], encoder_weights(obj, "student")
    else:
        raise UsageError(f"{f}: not a d2v_fast checkpoint or encoder export")
    model = Encoder(EncoderConfig(**cfg))
    model.load_state_dict(state)
    return model.eval()


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
    print(f"exported {args.weights} weights ({args.dtype}) to {out}; load with "
          f"transformers.Data2VecTextModel.from_pretrained({str(out)!r})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
