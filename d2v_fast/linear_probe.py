"""The linear probe's core, the same for every modality: pooled features of a labelled task's
examples in, a linear classifier (multinomial logistic regression, full-batch L-BFGS in
float64 on standardised features, L2 strength chosen on the validation split; deterministic)
fitted on train and scored on test, for the encoder and for the same architecture at random
initialisation (the floor), and the result: a JSON-ready record and its one-line summary.

Each modality supplies its features and tasks (``d2v_fast/modalities/``); ``d2v_fast/probing.py``
finds the encoder of a run or export directory and runs them; see docs/probe.md."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROBE_FILE = "probe.json"
# L2 strengths tried (on standardised features); the best on the validation split wins.
# Weaker ones need hundreds of L-BFGS iterations (tens of seconds on a busy CPU).
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1)
# Random initialisations averaged for the text floor (benchmarks/results/probe-default-job-cpu.json:
# single floors of the tiny text encoder span 0.439-0.477 over seeds 0-9).
FLOOR_INITS = 3


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float) -> torch.Tensor:
    """Multinomial logistic regression (weights with the bias as last row) by full-batch
    L-BFGS from zero: a convex problem, so the result depends on the data only."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.zeros(xb.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=150, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + weight_decay * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1)


def macro_f1(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in ``y`` of 2TP / (2TP + FP + FN)."""
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        if tp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def linear_probe(features: torch.Tensor, task) -> dict:
    """Fit on train (features standardised with train statistics), choose the L2 strength
    by validation accuracy, score on test. Deterministic: float64 on the CPU, no RNG."""
    x = features.double()
    y = torch.tensor(task.labels)
    tr, va, te = (torch.tensor(task.indices(s)) for s in ("train", "val", "test"))
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    k = len(task.classes)
    best = None
    for wd in WEIGHT_DECAYS:
        w = _fit_logistic(x[tr], y[tr], k, wd)
        val_acc = float((_predict(w, x[va]) == y[va]).double().mean())
        if best is None or val_acc > best[0]:  # ties keep the weaker L2 tried first
            best = (val_acc, wd, w)
    val_acc, wd, w = best
    pred = _predict(w, x[te])
    return {"accuracy": float((pred == y[te]).double().mean()), "macro_f1": macro_f1(pred, y[te], k),
            "val_accuracy": val_acc, "weight_decay": wd}


def probe_with_floor(encoder, task, features, fresh, head: dict, *, floor_inits: int = FLOOR_INITS,
                     seed: int = 0, progress: bool = False) -> dict:
    """The probe of every modality: ``linear_probe`` of ``features(encoder, tick)`` ([N, C]
    pooled features of the task's examples; ``tick(n)`` after every ``n`` of them, or None)
    and, for the floor, of ``features(fresh(), tick)``, the same architecture at random
    initialisation, made under seeds ``seed .. seed + floor_inits - 1`` (0: no floor; the
    global RNG is left as it was). ``random_init`` holds the mean accuracy and macro-F1 over
    those and each one's result; ``margin`` is accuracy minus that mean. ``head`` leads the
    JSON-ready result (task, classes, examples, unit, ...). ``progress``: a bar on stderr over
    every encoder's pass over the examples, naming what runs."""
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="probe", unit=f" {head.get('unit', 'documents')}", total=(1 + floor_inits) * len(task.labels),
                   file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def probed(enc, what: str) -> dict:
        if bar is not None:
            bar.set_postfix_str(what)
        x = features(enc, bar.update if bar is not None else None)
        if bar is not None:
            bar.set_postfix_str(f"{what}: fitting the classifier")
        return linear_probe(x, task)

    try:
        result = {**head, "seed": seed, **probed(encoder, "pretrained encoder")}
        if floor_inits:
            inits = []
            for i, s in enumerate(range(seed, seed + floor_inits)):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s)
                    rand = fresh()
                inits.append({"seed": s, **probed(rand, f"random init {i + 1}/{floor_inits}")})
                del rand
            mean = {k: sum(r[k] for r in inits) / len(inits) for k in ("accuracy", "macro_f1", "val_accuracy")}
            result["random_init"] = {**mean, "inits": inits}
            result["margin"] = result["accuracy"] - mean["accuracy"]
    finally:
        if bar is not None:
            bar.close()
    result["seconds"] = time.perf_counter() - t0
    return result


def is_model_dir(path, modality: str, hf_model_type: str) -> bool:
    """Whether ``path`` is a run directory of ``modality`` or a Hugging Face model directory
    of ``hf_model_type`` (``config.json``'s ``modality`` or ``model_type``, or the run's
    ``encoder.json``)."""
    path = Path(path)
    for name, key, want in (("config.json", "modality", modality), ("config.json", "model_type", hf_model_type),
                            ("encoder.json", "modality", modality)):
        try:
            if json.loads((path / name).read_text()).get(key) == want:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def summary(result: dict) -> str:
    floor = result.get("random_init")
    tail = f" vs {floor['accuracy']:.2f} at random init" if floor else ""
    return f"probe: {result['accuracy']:.2f} accuracy{tail}"


def details(result: dict) -> str:
    ex = result["examples"]
    floor = result.get("random_init")
    f1 = f"macro-F1 {result['macro_f1']:.3f}" + (f" vs {floor['macro_f1']:.3f}" if floor else "")
    inits = ""
    if floor:
        accs = ", ".join(f"{r['accuracy']:.3f}" for r in floor["inits"])
        inits = f"; random init: mean of {len(floor['inits'])} (accuracy {accs}), margin {result['margin']:+.3f}"
    unit = result.get("unit", "documents")  # speech: utterances
    return (f"{result['classes']} classes, {ex['train']}/{ex['val']}/{ex['test']} train/val/test {unit} "
            f"({result['task']}); {f1}{inits}; {result['seconds']:.1f}s")


def write_result(result: dict, path: Path) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
