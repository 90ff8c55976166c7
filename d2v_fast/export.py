"""Hugging Face export: a checkpoint's encoder as a model directory of its modality's class
(``Data2VecTextModel``, ``Data2VecAudioModel`` or ``Data2VecVisionModel``).

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
import sys
from pathlib import Path

from .errors import UsageError, cli_entry
from .hf_text import DTYPES, _run_dir
from .pretrained import _load_state, encoder_weights, modality_of, resolve_checkpoint


# ----------------------------------------------------------------------------- export
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
