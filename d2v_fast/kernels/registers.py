"""Registers and spills of every Triton kernel in ``d2v_fast.kernels``, compiled for an
NVIDIA H100 / H200 (sm_90) on a machine without a GPU, at the base shapes of every recipe.

    python -m d2v_fast.kernels.registers [--json OUT] [--arch 90] [--case text-data2vec ...]

How: Triton is given a stand-in driver that reports a ``GPUTarget("cuda", arch, 32)`` and
every ``JITFunction.run`` becomes ``warmup=True`` (compile, do not launch). The project's own
launchers (``gather.py``, ``targets.py``, ``ema.py``, ``loss.py``) then run on CPU tensors
of the real shapes, so each kernel is compiled with exactly the signature, specialisation
(integer divisibility, constexprs), ``num_warps`` and ``num_stages`` its launcher picks for
that shape. Nothing runs: the launchers' outputs are garbage, only the compile matters.
Registers, stack and shared memory come from the cubin (Triton's bundled ``cuobjdump
--dump-resource-usage``); spill bytes from the ``ptxas -v`` log of Triton's own ptxas run
(the same binary and flags that made the cubin; a fresh temporary Triton cache makes every
kernel compile, so there is always a log). Blocks per SM are the sm_90 limits applied to
those numbers (65,536 registers and 64 warps per SM, 228 KiB shared memory with 1 KiB
reserved per block, at most 32 blocks); ``waves`` = programs / (blocks per SM x 132 SMs).

The shapes come from the ``base`` presets (``d2v_fast.config.preset``) of each modality and
recipe: top-K layers, per-layer and final norms, mask rates and clones, loss beta, C, T
(512 text tokens; 999 frames from 320,000-sample speech crops; 196 patches + CLS of a
ViT-B/16 at 224), and masks drawn by the data pipeline's own mask functions. The batch held
by one GPU is not a preset value (presets give the global batch): ``CASES`` states the
per-GPU batch used. The batch changes the grid, the divisibility-by-16 specialisation of
integer arguments (row counts) and, for the split method, into how many time splits the
statistics go; not the tiles. So every build_targets case with an instance norm runs both
methods (``fused`` and ``split``, see ``targets.TIME_METHOD``), the split one also with a
single time split (``[split S=1]``: what a larger batch gets). The EMA step (case ``ema``) is the 85.05M
fp32 parameters of a RoBERTa-base layer stack. ``masked_gather``, ``masked_scatter`` and ``regression_loss``
are listed although ``auto`` kernels mode runs their eager twins (``d2v_fast.ops``
``EAGER_ON_AUTO``): ``--train.kernels triton`` runs them.

This must run in a fresh process in which TRITON_INTERPRET is unset (the kernel modules
decide at import whether they are interpreted); ``main`` removes it before importing them
and refuses to run if they were already imported in interpreter mode.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

SMS = 132  # H100 SXM and H200
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024

# Every kernel a launcher launches (the other @triton.jit functions are helpers they call).
KERNELS = ("_targets_token_kernel", "_targets_time_kernel", "_instance_stats_kernel", "_instance_finalize_kernel",
           "_instance_apply_kernel", "_move_rows_kernel", "_regression_loss_kernel", "_scale_rows_kernel",
           "_ema_flat_kernel", "_ema_multi_kernel", "_layer_norm_dual_kernel")


@dataclasses.dataclass(frozen=True)
class Case:
    """One recipe at its base preset on one GPU: ``batch`` samples (each cloned ``clones``
    times by the data2vec 2.0 recipes, as the preset says)."""

    key: str
    modality: str
    recipe: str
    batch: int
    why: str  # where the per-GPU batch comes from


CASES = (
    Case("text-data2vec", "text", "data2vec", 32, "the preset's 256 sequences a step over 8 GPUs"),
    Case("text-data2vec2", "text", "data2vec2", 16, "the preset's 64 sequences a step over 4 GPUs, x 8 clones"),
    Case("speech-data2vec", "audio", "data2vec", 19, "the preset's 304 utterances a step over 16 GPUs"),
    Case("speech-data2vec2", "audio", "data2vec2", 5, "the preset's 40 utterances a step over 8 GPUs, x 8 clones"),
    Case("images-data2vec", "images", "data2vec", 128, "the preset's 2048 images a step over 16 GPUs"),
    Case("images-data2vec2", "images", "data2vec2", 16, "the preset's 256 images a step over 16 GPUs, x 16 clones"),
)


# ----------------------------------------------------------------------------- tools
def tool_paths(arch: int = 90) -> dict[str, Path]:
    """The ptxas Triton runs for ``arch`` and the cuobjdump it bundles."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    return {"ptxas": Path(get_ptxas(arch).path), "cuobjdump": Path(knobs.nvidia.cuobjdump.path)}


def missing_tools(arch: int = 90) -> Optional[str]:
    """Why the report cannot run here (None if it can): Triton or its bundled tools absent."""
    try:
        import triton  # noqa: F401

        paths = tool_paths(arch)
    except Exception as exc:  # no triton, or no NVIDIA backend in it
        return f"triton with its NVIDIA backend is not importable ({type(exc).__name__}: {exc})"
    for name, path in paths.items():
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"Triton's bundled {name} is missing ({path})"
    return None


# ----------------------------------------------------------------------------- compile, don't launch
class _Driver:
    """What ``JITFunction.run`` asks of the active driver, for a CUDA target without a GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("no GPU: kernels are compiled, not run")


class _Recorder:
    """Turns every launch into a compile and records it: kernel, grid, constexprs, the
    compiled kernel and the ptxas log of its compile."""

    def __init__(self):
        self.launches: list[dict] = []
        self.logs: dict[str, str] = {}  # compiled hash -> ptxas -v log
        self.case = ""
        self.op = ""

    def install(self, arch: int) -> None:
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        driver.set_active(_Driver(arch))
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v log: captured below
        original = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
            if kernel.hash not in recorder.logs or out.getvalue():
                recorder.logs[kernel.hash] = out.getvalue() or recorder.logs.get(kernel.hash, "")
            g = grid(dict(zip(fn.arg_names, args))) if callable(grid) else grid
            consts = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in kwargs.items()
                      if k not in ("num_warps", "num_stages", "num_ctas", "debug")}
            recorder.launches.append({"case": recorder.case, "op": recorder.op, "kernel": fn.fn.__name__,
                                      "grid": [int(x) for x in g], "constexprs": consts, "compiled": kernel})
            return kernel

        JITFunction.run = run
        from . import ema, gather, loss, norm, targets

        for module in (ema, gather, loss, norm, targets):  # CPU tensors are fine: nothing is launched
            module.check_device = lambda *a, **k: None


def _ptxas_numbers(log: str, name: str) -> dict:
    """Spill bytes and registers of ``name`` from a ptxas -v log (None where absent)."""
    part = log[log.find(f"Function properties for {name}"):] if f"Function properties for {name}" in log else log
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", part)
    regs = re.search(r"Used (\d+) registers", part)
    return {"spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "ptxas_regs": int(regs.group(1)) if regs else None}


def _ptxas_again(compiled, arch: int) -> str:
    """The ptxas -v log of the kernel's PTX, with Triton's flags (when no log was captured)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        cmd = [str(tool_paths(arch)["ptxas"]), "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(compiled.metadata.target.arch)}", str(ptx),
               "-o", str(Path(d) / "k.cubin")]
        if not getattr(compiled.metadata, "enable_fp_fusion", True):
            cmd.insert(1, "--fmad=false")
        done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout + done.stderr


def blocks_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Resident blocks of one kernel on an sm_90 SM, from its registers, warps and shared memory."""
    per_warp = math.ceil(regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM))


def resources(compiled, log: str, arch: int) -> dict:
    """Registers, stack, local and shared memory (cubin), spills (ptxas log), occupancy."""
    name = compiled.name
    if _ptxas_numbers(log, name)["spill_stores"] is None:
        log = _ptxas_again(compiled, arch)
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([str(tool_paths(arch)["cuobjdump"]), "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage for {name}: {dump.stdout}{dump.stderr}")
    regs, stack, static_shared, local = (int(x) for x in m.groups())
    md = compiled.metadata
    shared = int(md.shared)
    per_sm = blocks_per_sm(regs, md.num_warps, shared)
    return {"regs": regs, **_ptxas_numbers(log, name), "stack": stack, "local": local,
            "static_shared": static_shared, "shared": shared, "num_warps": md.num_warps,
            "num_stages": md.num_stages, "blocks_per_sm": per_sm, "warps_per_sm": per_sm * md.num_warps}


# ----------------------------------------------------------------------------- the cases
def _masks(case: Case, cfg, T: int, B: int):
    """The recipe's masks from the data pipeline's own mask functions (seed 0, epoch 0):
    ``[B * clones, T]`` bool, True = masked (patches only for images)."""
    import torch

    r = cfg.recipe
    idx = torch.arange(B)
    if case.modality == "text":
        from ..data.text.masking import random_mask, span_mask

        maskable = torch.ones(B, T, dtype=torch.bool)
        if r.name == "data2vec2":
            return random_mask(maskable, mask_prob=r.mask_prob, seed=0, epoch=0, indices=idx, clones=r.clones)
        return span_mask(maskable, mask_prob=r.mask_prob, span=r.mask_span, seed=0, epoch=0, indices=idx)
    if case.modality == "audio":
        from ..data.audio.masking import span_masks

        clones = r.clones if r.name == "data2vec2" else 1
        return span_masks(T, idx, mask_prob=r.mask_prob, span=r.mask_span, seed=0, epoch=0, clones=clones)
    from ..data.images.masking import block_mask, inverse_block_mask

    grid = cfg.model.grid
    if r.name == "data2vec2":
        return inverse_block_mask(grid, mask_prob=r.mask_prob, seed=0, epoch=0, indices=idx,
                                  block=r.mask_span, mask_prob_adjust=r.mask_prob_adjust, clones=r.clones)
    return block_mask(grid, num_masked=r.mask_patches, min_block=r.mask_min_block, seed=0, epoch=0, indices=idx)


def describe(case: Case) -> dict:
    """The shape of a case, from its base preset."""
    from ..config import preset

    cfg = preset("base", case.recipe, case.modality)
    r, m = cfg.recipe, cfg.model
    if case.modality == "audio":
        from ..models.audio import num_frames

        T, unit = num_frames(m, cfg.data.max_samples), f"frames of {cfg.data.max_samples}-sample crops"
    elif case.modality == "images":
        T, unit = m.num_patches, f"patches (+ CLS) of {m.image_size}px images, {m.patch_size}px patches"
    else:
        T, unit = cfg.data.seq_len, "tokens"
    clones = r.clones if r.name == "data2vec2" else 1
    return {"case": case.key, "modality": case.modality, "recipe": case.recipe, "batch": case.batch,
            "batch_why": case.why, "clones": clones, "T": T, "T_unit": unit, "C": m.hidden_size, "K": r.top_k,
            "layer_norm": r.layer_norm, "final_norm": r.final_norm, "loss_beta": r.loss_beta,
            "loss_scale": r.loss_scale, "padding": case.modality == "text" and cfg.data.block_mode == "document",
            "_cfg": cfg}


def ema_parameter_shapes(C: int = 768, ffn: int = 3072, layers: int = 12) -> list[tuple[int, ...]]:
    """The parameters of a RoBERTa-base encoder layer stack (85.05M at base): what data2vec
    text's teacher holds (its EMA source is the encoder layers)."""
    one = [(C, C), (C,)] * 4 + [(C,), (C,), (ffn, C), (ffn,), (C, ffn), (C,), (C,), (C,)]
    return one * layers


def run_case(case: Case, rec: _Recorder) -> dict:
    """Drive every launcher one training step of ``case`` calls (forward and backward)."""
    import torch

    from . import gather, loss, norm, targets

    d = describe(case)
    cfg = d.pop("_cfg")
    r = cfg.recipe
    B, T, C, K = case.batch, d["T"], d["C"], d["K"]
    bf16 = torch.bfloat16
    cls = 1 if case.modality == "images" else 0  # the encoder's rows: CLS first, then the patches
    mask = _masks(case, cfg, T, B)  # [B * clones, T]
    R = mask.shape[0]
    pad = None
    if d["padding"]:  # document blocks: every other sequence ends early, in padding
        lengths = torch.full((B,), T)
        lengths[1::2] = T - 37 * (1 + torch.arange(B // 2) % 7)
        pad = torch.arange(T)[None, :] >= lengths[:, None]
        mask = mask & ~pad
    d["masked_rows"] = int(mask.sum())
    lnorm = r.norm(r.layer_norm)
    fnorm = r.norm(r.final_norm)
    scale = r.loss_scale if r.loss_scale > 0 else None

    def step(op: str, fn: Callable[[], None]) -> None:
        rec.case, rec.op = case.key, op
        fn()

    # teacher layer outputs [B, T, C] (bf16); images: the block outputs with CLS dropped (views)
    layers = [torch.empty(B, T + cls, C, dtype=bf16)[:, cls:] for _ in range(K)]
    instance = "instance" in (lnorm, fnorm)
    methods = [("fused", None), ("split", None), ("split", 0)] if instance else [("fused", None)]
    for method, min_programs in methods:  # min_programs 0: the statistics in one time split
        saved = targets.TIME_METHOD, targets.SPLIT_MIN_PROGRAMS
        targets.TIME_METHOD = method
        if min_programs is not None:
            targets.SPLIT_MIN_PROGRAMS = min_programs
        try:
            tag = f" [{method}{' S=1' if min_programs == 0 else ''}]" if instance else ""
            step(f"build_targets{tag}", lambda: targets.build_targets(
                layers, padding_mask=pad, mask=mask, layer_norm=lnorm, final_norm=fnorm, count=int(mask.sum())))
            if case.modality == "images" and r.name == "data2vec2" and r.cls_loss_weight > 0:
                step(f"build_targets CLS{tag}", lambda: targets.build_targets(
                    layers, layer_norm=lnorm, final_norm=fnorm))
        finally:
            targets.TIME_METHOD, targets.SPLIT_MIN_PROGRAMS = saved

    def fwd_bwd(op: str, forward: Callable[[], torch.Tensor]) -> None:
        rec.case, rec.op = case.key, f"{op} fwd"
        y = forward()
        rec.op = f"{op} bwd"
        y.backward(torch.empty_like(y))

    if case.modality == "text":  # a post-LN block's LayerNorm with its bf16 copy (--train.bf16_student/teacher)
        x = torch.empty(B, T, C)
        step("layer_norm_dual", lambda: norm.layer_norm_dual_fwd(x, torch.empty(C), torch.empty(C), 1e-5, bf16))
        step("layer_norm_dual no statistics", lambda: norm.layer_norm_dual_fwd(
            x, torch.empty(C), torch.empty(C), 1e-5, bf16, stats=False))
        step("layer_norm_dual + residual (the teacher's)", lambda: norm.layer_norm_dual_fwd(
            x, torch.empty(C), torch.empty(C), 1e-5, bf16, stats=False, residual=torch.empty(B, T, C, dtype=bf16)))

    N = int(mask.sum())
    if r.name == "data2vec":  # the student's hidden states at the masked rows
        h = torch.empty(B, T + cls, C, dtype=bf16, requires_grad=True)
        rows_mask = torch.cat([mask.new_zeros(B, cls), mask], dim=1)
        fwd_bwd("masked_gather", lambda: gather.masked_gather(h, rows_mask, N))
    else:
        keep = ~mask
        k = int(keep[0].sum())
        if case.modality == "audio":  # features repeated per clone, masked frames zeroed: a plain gather
            x = torch.empty(R, T, C, dtype=bf16, requires_grad=True)
            fwd_bwd("masked_gather visible", lambda: gather.masked_gather(x, keep, R * k))
        else:  # text tokens / CLS + patches: every clone's visible rows straight from [B, T, C]
            x = torch.empty(B, T + cls, C, dtype=bf16, requires_grad=True)
            keep_rows = torch.cat([keep.new_ones(R, cls), keep], dim=1)
            fwd_bwd("masked_gather clones", lambda: gather.masked_gather(x, keep_rows, int(keep_rows.sum())))
        rows = torch.empty(R * k, C, dtype=bf16, requires_grad=True)
        noise = torch.empty(R, T, C, dtype=bf16)
        fwd_bwd("masked_scatter noise fill", lambda: gather.masked_scatter(rows, keep, noise))
        hd = torch.empty(R, C, T, dtype=bf16, requires_grad=True)  # the decoder's [R, C, T] output, transposed
        fwd_bwd("masked_gather decoder", lambda: gather.masked_gather(hd.transpose(1, 2), mask, N))
    pred = torch.empty(N, C, dtype=bf16, requires_grad=True)
    tgt = torch.empty(N, C, dtype=torch.float32)
    name = "regression_loss " + ("MSE" if r.loss_beta == 0 else f"smooth L1 b={r.loss_beta:g}")
    fwd_bwd(name, lambda: loss.regression_loss(pred, tgt, beta=r.loss_beta, scale=scale))
    if case.modality == "images" and r.name == "data2vec2" and r.cls_loss_weight > 0:
        cls_pred = torch.empty(R, C, dtype=torch.float32, requires_grad=True)
        cls_tgt = torch.empty(R, C, dtype=torch.float32)
        fwd_bwd(name + " CLS", lambda: loss.regression_loss(cls_pred, cls_tgt, beta=r.loss_beta, scale=scale,
                                                             reduction="none").sum())
    return d


def run_ema(rec: _Recorder, C: int = 768) -> dict:
    """The EMA step over a RoBERTa-base layer stack (85.05M fp32 parameters, the teacher of
    data2vec text): flat buffers (``flatten_params_``, what the trainer sets up) with and
    without the on-device skip flag and the bf16 shadow, and per-tensor lists (FSDP shards)."""
    import torch

    from . import ema

    shapes = ema_parameter_shapes(C)
    n = sum(math.prod(s) for s in shapes)
    rec.case = "ema"

    def step(op: str, fn: Callable[[], None]) -> None:
        rec.op = op
        fn()

    t_flat, s_flat = torch.empty(n), torch.empty(n)
    skip, shadow = torch.tensor(False), torch.empty(n, dtype=torch.bfloat16)
    step("ema_update_ flat", lambda: ema.ema_update_(t_flat, s_flat, 0.999))
    step("ema_update_ flat skip", lambda: ema.ema_update_(t_flat, s_flat, 0.999, skip=skip))
    step("ema_update_ flat bf16 shadow", lambda: ema.ema_update_(t_flat, s_flat, 0.999, shadow=shadow))
    step("ema_update_ flat skip + bf16 shadow",
         lambda: ema.ema_update_(t_flat, s_flat, 0.999, skip=skip, shadow=shadow))
    teacher = [torch.empty(s) for s in shapes]
    student = [torch.empty(s) for s in shapes]
    step("ema_update_ tensor lists", lambda: ema.ema_update_(teacher, student, 0.999))
    return {"case": "ema", "parameters": n, "teacher": "fp32", "student": "fp32", "shadow": "bf16",
            "decay": "a float (as the trainer passes it)"}


# ----------------------------------------------------------------------------- report
def report(arch: int = 90, cases: tuple[Case, ...] = CASES, with_ema: bool = True) -> dict:
    """Compile every kernel the launchers select at ``cases`` (and the EMA step) for
    ``arch``; the report as a dict. Afterwards this process launches nothing: its Triton
    driver is the stand-in and every launch only compiles."""
    os.environ.pop("TRITON_INTERPRET", None)
    # Triton 3.9's default (FP fusion on), stated so that it does not warn; a value set is kept
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    import triton
    from triton import knobs

    from . import AVAILABLE, IMPORT_ERROR, is_interpreted

    if not AVAILABLE:
        raise RuntimeError(f"triton is not importable: {IMPORT_ERROR}")
    from . import gather

    if is_interpreted(gather._move_rows_kernel):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1 in this process; run "
                           "`python -m d2v_fast.kernels.registers` in a fresh process without it")
    why = missing_tools(arch)
    if why:
        raise RuntimeError(why)
    torch.set_num_threads(1)
    rec = _Recorder()
    rec.install(arch)
    described = []
    with tempfile.TemporaryDirectory(prefix="d2v-registers-") as cache:
        knobs.cache.dir = cache  # compile everything here (so ptxas runs and logs); nothing kept
        for case in cases:
            described.append(run_case(case, rec))
        ema_case = run_ema(rec) if with_ema else None
        kernels: dict[str, dict] = {}
        rows = []
        for launch in rec.launches:
            compiled = launch.pop("compiled")
            if compiled.hash not in kernels:
                kernels[compiled.hash] = resources(compiled, rec.logs.get(compiled.hash, ""), arch)
            res = kernels[compiled.hash]
            programs = math.prod(launch["grid"])
            waves = programs / max(1, res["blocks_per_sm"] * SMS)
            rows.append({**launch, "programs": programs, **res, "waves": round(waves, 2), "hash": compiled.hash[:16]})
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    return {"tool": "python -m d2v_fast.kernels.registers", "arch": f"sm_{arch}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__, "torch": torch.__version__,
            "ptxas": f"{Path(ptxas.path).name} {ptxas.version}", "sms": SMS, "distinct_kernels": len(kernels),
            "cases": described, "ema": ema_case, "rows": rows}


def format_table(doc: dict) -> str:
    lines = [f"triton {doc['triton']}, torch {doc['torch']}, target {doc['arch']} (compiled with {doc['ptxas']}, "
             f"not run); {doc['distinct_kernels']} distinct kernels"]
    for c in doc["cases"]:
        lines.append(f"  {c['case']}: B={c['batch']}" + (f" x {c['clones']} clones" if c["clones"] > 1 else "")
                     + f", T={c['T']} {c['T_unit']}, C={c['C']}, K={c['K']} {c['layer_norm']}/{c['final_norm']}, "
                     + f"{c['masked_rows']} masked rows" + (", padded" if c["padding"] else ""))
    if doc.get("ema"):
        lines.append(f"  ema: {doc['ema']['parameters']:,} fp32 parameters (RoBERTa-base layer stack), bf16 shadow")
    head = (f"{'case':<17}{'op':<37}{'kernel':<26}{'regs':>5}{'spill st/ld':>12}{'warps':>6}{'stages':>7}"
            f"{'smem':>7}{'programs':>9}{'blk/SM':>7}")
    lines += [head, "-" * len(head)]
    for r in doc["rows"]:
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['case']:<17}{r['op']:<37}{r['kernel']:<26}{r['regs']:>5}{spill:>12}{r['num_warps']:>6}"
                     f"{r['num_stages']:>7}{r['shared']:>7}{r['programs']:>9}{r['blocks_per_sm']:>7}")
    spilling = sorted({r["kernel"] for r in doc["rows"] if r["spill_stores"] or r["spill_loads"]})
    lines.append("spills: " + (", ".join(spilling) if spilling else "none"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2v_fast.kernels.registers", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="", help="also write the report here (JSON)")
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = H100/H200)")
    p.add_argument("--case", action="append", choices=[c.key for c in CASES] + ["ema"],
                   help="only these cases (repeatable; default all)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cases = tuple(c for c in CASES if not args.case or c.key in args.case)
    doc = report(args.arch, cases, with_ema=not args.case or "ema" in args.case)
    print(format_table(doc))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, out)  # a reader never sees half a report
    return 0


if __name__ == "__main__":
    sys.exit(main())
