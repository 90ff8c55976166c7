"""One full optimizer step, timed: ``python -m d2v_fast.bench``.

    python -m d2v_fast.bench [--modality text|images] [--config tiny|base|large] [--batch-size B] [--seq-len T]
                             [--providers d2v_fast,hf,reference,reference+compile] [--steps N] [--warmup N]
                             [--ablation] [--json PATH] [--section.field VALUE ...]
    python -m d2v_fast.bench --cost [--suite] [--modality M] [--recipe R] [--json PATH]   # d2v_fast/cost.py

``--ablation`` times the ``d2v_fast`` step with every performance switch of ``ABLATION`` on,
then with each one off in turn, then with all of them at their defaults, and on a GPU the
defaults with the encoder stacks as CUDA graphs (one process, so compiled graphs are shared
between the rows), after the ``--providers`` named explicitly.

A step is student forward/backward, teacher forward, targets, loss, optimizer and EMA, on
synthetic batches (random token ids, real span masks) so no corpus is needed. Providers:
``d2v_fast`` (the engine's trainer step), ``hf`` (the same step written plainly on Hugging Face
``transformers``, d2v_fast/reference/hf_step.py; data2vec only), ``reference`` (the eager
implementation in d2v_fast/reference) and ``reference+compile`` (``torch.compile`` of the
reference model). ``--modality images``: random uint8 photos of the model's image size with
real block masks (augmented on the GPU, in the "loader" on the CPU), providers ``d2v_fast``
and ``reference`` (``d2v_fast/reference/images.py``); the tokens/s column counts patches.
Prints tokens/s, model TFLOP/s, MFU against the device's dense bf16 peak and peak memory.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import parse_args
from .errors import UsageError, cli_entry
from .steptimer import ablation_configs, environment, format_table, measure


@cli_entry
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cost" in argv:
        from .cost import main as cost_main

        return cost_main([a for a in argv if a != "--cost"])
    own = {"--providers": "d2v_fast,reference", "--steps": "10", "--warmup": "3", "--json": ""}
    ablation = "--ablation" in argv
    argv = [a for a in argv if a != "--ablation"]
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] in own and i + 1 < len(argv):
            own[argv[i]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    if "--train.progress" not in rest:
        rest += ["--train.progress", "false"]
    cfg, _ = parse_args(rest, description=__doc__)
    try:
        steps, warmup = int(own["--steps"]), int(own["--warmup"])
    except ValueError:
        raise UsageError(f"--steps/--warmup: expected integers, got {own['--steps']!r}/{own['--warmup']!r}") from None
    if steps < 1 or warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    device = torch.device("cuda") if torch.cuda.is_available() and cfg.train.device != "cpu" else torch.device("cpu")
    providers = [p.strip() for p in own["--providers"].split(",") if p.strip()]
    if ablation:  # --providers given too: those first, in the same process (same warm GPU)
        explicit = "--providers" in argv
        rows = [measure(p, cfg, device=device, batch_size=cfg.train.batch_size, steps=steps, warmup=warmup)
                for p in (providers if explicit else [])]
        for label, c in ablation_configs(cfg, device):
            rows.append({**measure("d2v_fast", c, device=device, batch_size=cfg.train.batch_size, steps=steps,
                                   warmup=warmup), "provider": label})
    else:
        rows = [measure(p, cfg, device=device, batch_size=cfg.train.batch_size, steps=steps, warmup=warmup)
                for p in providers]
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | preset {cfg.preset}, "
          f"batch {cfg.train.batch_size} x {rows[0]['seq_len'] if rows else '?'} {rows[0]['unit'] if rows else ''} "
          f"({cfg.modality}, {cfg.recipe.name})")
    print(format_table(rows))
    if own["--json"]:
        record = {**env, "modality": cfg.modality, "recipe": cfg.recipe.name, "rows": rows}
        if own["--json"].endswith(".jsonl"):  # one line per run, appended: a suite collects many runs in one file
            with open(own["--json"], "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            Path(own["--json"]).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
