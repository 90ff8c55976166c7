"""Linear probe: is the pretrained encoder any good?

    python -m d2v_fast.probe RUN_DIR_OR_EXPORT_DIR [--task FILE.jsonl] [--seed S] [--device cpu|cuda]
                             [--max-len T] [--batch-size N] [--floor-inits K] [--out probe.json]

The encoder is frozen; each document becomes the mean of its last hidden state over its
real tokens (padding left out), and a linear classifier (multinomial logistic regression,
full-batch L-BFGS in float64, L2 strength chosen on the validation split) is fitted on the
train split and scored on the test split. The same architecture at random initialisation,
computed in the same run, is the floor: the margin above it is what pretraining learned
that a random projection of the tokens does not already give. The floor is the mean over
``--floor-inits`` random initialisations (seeds S, S+1, ...; default 3 for text): one
draw's accuracy varies by about 1.5 points from seed to seed on the built-in task, as much
as the tiny default job's whole margin, so one draw would make the margin mostly noise.
Speech and images default to 1 (their tiny jobs' margins are 5-12 points).

The built-in task asks which standard-library module a docstring comes from (23 modules
on Python 3.11); its test documents are held out of the built-in pretraining corpus. A
user task is a JSON-lines file with ``text`` and ``label`` fields (and optionally ``split``:
train, val or test; without it the documents are split 60/20/20 per label, seeded).

RUN_DIR_OR_EXPORT_DIR is a run directory (its ``encoder.safetensors``, else its newest checkpoint)
or a Hugging Face ``Data2VecTextModel``/``RobertaModel`` directory (``python -m
d2v_fast.export`` writes one). For a run directory the result is also written to
``RUN_DIR/probe.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UsageError, cli_entry
from .models.encoder import Encoder, EncoderConfig

PROBE_FILE = "probe.json"
DEFAULT_MAX_LEN = 128  # tokens per document: the tiny preset's length; the same for every encoder
DEFAULT_BATCH = 64
# L2 strengths tried (on standardised features); the best on the validation split wins.
# Weaker ones need hundreds of L-BFGS iterations (tens of seconds on a busy CPU).
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1)
# Random initialisations averaged for the text floor (benchmarks/results/probe-default-job-cpu.json:
# single floors of the tiny text encoder span 0.439-0.477 over seeds 0-9).
FLOOR_INITS = 3


# ----------------------------------------------------------------------------- the encoder
@dataclass
class Probed:
    encoder: Encoder
    tokenizer: object  # tokenizers.Tokenizer
    kind: str  # "run" or "hf"
    path: Path
    corpus: Path | None  # the pretraining corpus, when known


def _hf_encoder(path: Path) -> Encoder:
    from .export import read_hf_model

    config, weights = read_hf_model(path, flag="probe")
    for key, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if config.get(key, want) != want:
            raise UsageError(f"{path / 'config.json'}: {key} is {config.get(key)!r}; the probe's encoder "
                             f"has {want!r} only")
    try:
        pad = int(config.get("pad_token_id", 1))
        cfg = EncoderConfig(vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                            num_layers=int(config["num_hidden_layers"]), num_heads=int(config["num_attention_heads"]),
                            ffn_size=int(config["intermediate_size"]),
                            max_seq_len=int(config["max_position_embeddings"]) - pad - 1, pad_id=pad,
                            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                            init_std=float(config.get("initializer_range", 0.02)))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{path / 'config.json'}: missing or bad field {err}; not a Data2VecTextModel config") from None
    enc = Encoder(cfg)
    missing, unexpected = enc.load_state_dict(weights, strict=False)
    if missing:
        raise UsageError(f"{path}: lacks {len(missing)} encoder weight(s), e.g. {missing[0]}; "
                         f"not a complete Data2VecTextModel")
    return enc.eval()


def load_probed(path: str | os.PathLike) -> Probed:
    """The frozen encoder and tokenizer of a run directory or a Hugging Face model directory."""
    from . import checkpoint as ckpt
    from .data.tokenizer import load_tokenizer
    from .export import load_pretrained

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"RUN_DIR_OR_EXPORT_DIR {path}: no such directory; give a run directory or a "
                         f"Hugging Face export (python -m d2v_fast.export RUN_DIR OUT_DIR)")
    hf_config = path / "config.json"
    is_hf = False
    if hf_config.is_file():
        try:
            is_hf = json.loads(hf_config.read_text()).get("model_type") in ("data2vec-text", "roberta")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            is_hf = False
    if is_hf:
        return Probed(_hf_encoder(path), load_tokenizer(path, flag="probe"), "hf", path, None)
    if not (path / ckpt.ENCODER_META).is_file() and not (path / ckpt.LEGACY_ENCODER).is_file() \
            and ckpt.latest_checkpoint(path) is None:
        raise UsageError(f"RUN_DIR_OR_EXPORT_DIR {path}: neither a run directory (no {ckpt.ENCODER_FILE} or complete "
                         f"checkpoint) nor a Hugging Face model directory (no config.json with model_type "
                         f"data2vec-text); give one of those")
    encoder = load_pretrained(path)
    corpus = None
    try:
        corpus = Path(json.loads(hf_config.read_text())["data_dir"]) if hf_config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        corpus = None
    tok_dir = path / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file() and corpus is not None:
        tok_dir = corpus / "tokenizer"
    return Probed(encoder, load_tokenizer(tok_dir, flag=f"{path}: tokenizer"), "run", path, corpus)


# ----------------------------------------------------------------------------- features
def tokenize(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """``<s> text </s>`` as in pretraining blocks, cut to ``max_len`` tokens."""
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    out = []
    for e in encode(texts, add_special_tokens=False):
        out.append([bos, *e.ids[:max_len - 2], eos])
    return out


@torch.no_grad()
def mean_pooled(encoder: Encoder, ids: list[list[int]], *, batch_size: int = DEFAULT_BATCH,
                device: torch.device | str = "cpu", tick=None) -> torch.Tensor:
    """[N, C] float32 on the CPU: each document's last hidden state averaged over its real
    tokens. Batches are formed from documents of similar length (less padding) and only
    the pooled vectors are kept, so memory is one batch of activations plus N x C.
    ``tick(n)`` (progress) is called after each batch of ``n`` documents."""
    device = torch.device(device)
    pad = encoder.config.pad_id
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out = torch.empty(len(ids), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
        x = x.to(device)
        real = x.ne(pad)
        h = encoder(x, real.long()).float()
        pooled = (h * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)
        out[torch.tensor(rows)] = pooled.cpu()
        if tick is not None:
            tick(len(rows))
    return out


# ----------------------------------------------------------------------------- classifier
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


# ----------------------------------------------------------------------------- the probe
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


def load_task(task: str | os.PathLike | None, *, progress: bool = False):
    """A task file, or the built-in task (None or "builtin")."""
    from .data.probe_task import read_task

    if task is None or str(task) == "builtin":
        from .data.builtin import builtin_probe_task

        return read_task(builtin_probe_task(progress=progress), flag="built-in task")
    return read_task(task)


def probe_encoder(encoder: Encoder, tokenizer, task, *, floor_inits: int = FLOOR_INITS, seed: int = 0,
                  max_len: int = DEFAULT_MAX_LEN, batch_size: int = DEFAULT_BATCH,
                  device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Probe ``encoder`` (left in the mode it came in) and, for the floor, the same
    architecture at ``floor_inits`` random initialisations (0: none). Returns the result as a
    JSON-ready dict."""
    max_len = max(3, min(max_len, encoder.config.max_seq_len))
    ids = tokenize(tokenizer, task.texts, max_len)

    def features(enc, tick):
        was_training = enc.training
        enc.eval()
        try:
            return mean_pooled(enc, ids, batch_size=batch_size, device=device, tick=tick)
        finally:
            enc.train(was_training)

    head = {"task": task.source, "classes": len(task.classes),
            "examples": {s: len(task.indices(s)) for s in ("train", "val", "test")}, "max_len": max_len}
    return probe_with_floor(encoder, task, features, lambda: Encoder(encoder.config).to(device), head,
                            floor_inits=floor_inits, seed=seed, progress=progress)


def held_out(probed: Probed, task) -> bool | None:
    """Whether the task's test documents were held out of the run's pretraining corpus:
    True when that corpus records this very task file as held out, None when unknown."""
    import hashlib

    from .data.corpus import read_meta

    if probed.corpus is None or not Path(task.source).is_file():
        return None
    try:
        rec = read_meta(probed.corpus).get("probe") or {}
    except UsageError:
        return None
    if rec.get("sha256") == hashlib.sha256(Path(task.source).read_bytes()).hexdigest():
        return rec.get("held_out_of_pretraining") == "test"
    return None


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


def probe_path(path: str | os.PathLike, *, task: str | None = None, seed: int = 0, max_len: int = DEFAULT_MAX_LEN,
               batch_size: int = DEFAULT_BATCH, device: str = "cpu", out: str | os.PathLike | None = None,
               progress: bool = False, floor_inits: int | None = None) -> dict:
    """Probe a run or Hugging Face directory against its random-init floor; a run
    directory (or ``out``) receives ``probe.json``."""
    from .modalities.audio import is_speech_model  # a speech run or export: the built-in speaker task
    from .modalities.images import is_image_model  # an image run or export: its corpus's labels

    if is_image_model(path):
        from .modalities.images import probe_images_path

        return probe_images_path(path, seed=seed, device=device, out=out, floor_inits=floor_inits,
                                 progress=progress)
    if is_speech_model(path):
        from .modalities.audio import probe_speech_path

        return probe_speech_path(path, task=task, seed=seed, device=device, out=out, floor_inits=floor_inits,
                                 progress=progress)
    probed = load_probed(path)
    loaded = load_task(task, progress=progress)
    result = probe_encoder(probed.encoder.to(device), probed.tokenizer, loaded, seed=seed, max_len=max_len,
                           batch_size=batch_size, device=device,
                           floor_inits=FLOOR_INITS if floor_inits is None else floor_inits, progress=progress)
    result = {"model": str(probed.path), "kind": probed.kind, **result,
              "test_held_out_of_pretraining": held_out(probed, loaded)}
    target = Path(out) if out else (probed.path / PROBE_FILE if probed.kind == "run" else None)
    if target is not None:
        write_result(result, target)
    return result


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from .config import _Parser

    p = _Parser(prog="python -m d2v_fast.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("path", metavar="RUN_DIR_OR_EXPORT_DIR", help="run directory or Hugging Face model directory")
    p.add_argument("--task", metavar="FILE.jsonl", help="labelled task (text, label[, split]); default: built-in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init floor's first initialisation")
    p.add_argument("--floor-inits", type=int, default=None, metavar="K",
                   help=f"random initialisations averaged for the floor (0: no floor; default {FLOOR_INITS} "
                        f"for text, 1 for speech and images)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="tokens per document, <s> and </s> included")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="documents per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", metavar="FILE", help=f"write the result here (default: RUN_DIR/{PROBE_FILE} for a run)")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_len < 3:
        raise UsageError(f"--max-len {args.max_len}: must be at least 3 (<s>, one token, </s>)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.floor_inits is not None and args.floor_inits < 0:
        raise UsageError(f"--floor-inits {args.floor_inits}: must be at least 0 (0: no random-init floor)")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available; use --device cpu")
    result = probe_path(args.path, task=args.task, seed=args.seed, max_len=args.max_len,
                        batch_size=args.batch_size, device=args.device, out=args.out, progress=True,
                        floor_inits=args.floor_inits)
    print(summary(result))
    print(details(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
