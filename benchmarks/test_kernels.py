"""Fused kernels vs their eager twins (docs/design.md#kernels): providers `triton` (d2v_fast/kernels),
`triton+custom_op` (the same kernels reached through their torch.library custom ops, as
under torch.compile, instead of the direct autograd Functions: the difference is host
time), `triton_split` (build_targets' two-pass instance norm, ``D2V_TARGETS_TIME=split``), `eager` (d2v_fast/kernels/eager.py) and `compiled` (torch.compile of the eager twin).

    python -m pytest benchmarks/test_kernels.py -q
    D2V_BENCH_WRITE=1 python -m pytest benchmarks/test_kernels.py -q

On CUDA: data2vec-base shapes (B=128, T=512 -> 65,536 tokens, C=768, K=10 layers, ~31%
masked, bf16; EMA over a RoBERTa-base layer stack, 85.05M parameters, fp32 teacher with a
bf16 or fp32 student). Times are `triton.testing.do_bench` medians (CUDA events, L2
flushed between runs), stored in `extra_info` with the effective bandwidth (the op's
minimum bytes / time) and its fraction of this device's measured device-to-device copy
bandwidth (measured once per session). The pytest-benchmark statistics of each row time
the same call with a synchronize, host side. On CUDA each row also has `device_ms`: the
same call captured in a CUDA graph and replayed (`do_bench_cudagraph`), i.e. its GPU work
alone; `time_ms - device_ms` is what the host adds (Python, dispatch, launches, waits).
Calls that synchronise cannot be captured and say why; the `*_counted` rows are the gather
and the targets with the masked-row count given (`--train.host_counts`), which can.

The `*_clones` rows are data2vec 2.0 multi-mask (docs/design.md#recipes) at its text-base shape: B=64
samples, clone_batch 8, T=512, C=768, K=12 layers, exactly int(0.48*T) masked per clone;
targets at the masked rows of every clone (computed once per sample), the gather of the
student's kept rows of every clone straight from the un-cloned ``[B, T, C]`` batch.

On CPU the file only exercises itself: a tiny shape with `eager`, and `triton` in Triton's
interpreter at a very tiny shape (this module sets TRITON_INTERPRET=1 when there is no GPU,
before anything imports triton). Those numbers say nothing about the GPU.

The second form writes benchmarks/results/kernels-<device>.json (device name, torch and
triton versions, date, one row per op and provider).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # CPU: the kernels can only run in Triton's interpreter (docs/design.md#interpreter)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from d2v_fast import kernels  # noqa: E402
from d2v_fast.kernels import ema as kema  # noqa: E402
from d2v_fast.kernels import gather as kgather  # noqa: E402
from d2v_fast.kernels import loss as kloss  # noqa: E402
from d2v_fast.kernels import norm as knorm  # noqa: E402
from d2v_fast.kernels import targets as ktargets  # noqa: E402
from d2v_fast.kernels import eager as twin  # noqa: E402

CUDA = torch.cuda.is_available() and kernels.AVAILABLE and not kernels.is_interpreted(kgather._move_rows_kernel)
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # the interpreter computes in fp32 (docs/design.md#interpreter)
MASK_PROB = 0.31  # data2vec text v1 span masking masks ~31% of the tokens (fairseq config/text/pretraining/base.yaml)
MASK_PROB_V2 = 0.48  # data2vec 2.0: exactly int(0.48 * T) per clone (config/v2/base_text_only_task.yaml)
CLONES = 8  # data2vec 2.0 clone_batch
BETA = 4.0
RESULTS_DIR = Path(__file__).parent / "results"
RESULTS: list[dict] = []
SESSION: dict = {}


def shape_for(provider: str) -> dict:
    if CUDA:
        return dict(B=128, T=512, C=768, K=10, ffn=3072, layers=12)
    if provider.startswith("triton"):  # Triton's interpreter: NumPy per program
        return dict(B=2, T=16, C=32, K=2, ffn=64, layers=1)
    return dict(B=4, T=64, C=64, K=3, ffn=256, layers=2)


def shape_for_clones(provider: str) -> dict:
    """data2vec 2.0 text base (config/v2/base_text_only_task.yaml); tiny on the CPU."""
    if CUDA:
        return dict(B=64, clones=CLONES, T=512, C=768, K=12)
    if provider.startswith("triton"):
        return dict(B=2, clones=CLONES, T=16, C=32, K=2)
    return dict(B=4, clones=CLONES, T=64, C=64, K=3)


def roberta_layer_shapes(C: int, ffn: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of ``layers`` RoBERTa encoder layers (HF Data2VecTextModel order)."""
    one = [(C, C), (C,)] * 4 + [(C,), (C,), (ffn, C), (ffn,), (C, ffn), (C,), (C,), (C,)]
    return one * layers


# ----------------------------------------------------------------------------- timing
def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of a large buffer, measured once."""
    if "copy_Bps" not in SESSION:
        n = (1 << 28) if CUDA else (1 << 24)  # 1 GiB / 64 MiB of fp32
        src = torch.empty(n, device=DEVICE)
        dst = torch.empty_like(src)
        seconds = _time(lambda: dst.copy_(src), rounds=5)
        SESSION["copy_Bps"] = 2 * src.numel() * src.element_size() / seconds
        del src, dst
    return SESSION["copy_Bps"]


def _time(fn, rounds: int) -> float:
    """Median seconds of ``fn``: do_bench (CUDA events) on the GPU, perf_counter on the CPU."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _device_time(fn) -> tuple[float | None, str]:
    """Seconds of the op's GPU work alone: ``fn`` captured in a CUDA graph and replayed
    (``triton.testing.do_bench_cudagraph``), so no host time (Python, dispatch, launches)
    is in it. ``time_ms`` minus this is what the host adds. An op that synchronises (reads
    a count from the device) cannot be captured: (None, why)."""
    if not CUDA:
        return None, "CPU"
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3, ""
    except Exception as exc:  # e.g. a host sync inside the op
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {exc}"[:200]


# providers that run the triton kernels another way: (module, attribute, value) held for the
# whole timed call, backward included
VARIANTS = {"triton+custom_op": (kernels, "DISPATCH", "custom_op"), "triton_split": (ktargets, "TIME_METHOD", "split")}


def in_variant(provider: str, fn):
    if provider not in VARIANTS:
        return fn
    module, name, value = VARIANTS[provider]

    def call():
        before = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, before)
    return call


def run(benchmark, op: str, provider: str, fn, nbytes: int, shape: dict, capturable: bool = False):
    """Time ``fn`` (one op call), record a row; ``nbytes`` = the op's minimum memory traffic.
    ``capturable``: ``fn`` never synchronises, so its GPU work alone can be timed in a CUDA
    graph (only then is a capture tried: a failed capture can leave errors behind)."""
    fn = in_variant(provider, fn)
    benchmark.group = f"{op} ({DEVICE})"
    rounds = 3 if (provider.startswith("triton") and not CUDA) else 20
    if provider == "compiled":
        try:
            fn()
        except Exception as exc:  # the baseline, not our code: say why and move on
            pytest.skip(f"torch.compile of the eager {op} failed: {type(exc).__name__}: {exc}"[:300])

    def call():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    seconds = _time(fn, rounds)
    row = {"op": op, "provider": provider, "dtype": str(DTYPE).replace("torch.", ""), "shape": shape,
           "time_ms": seconds * 1e3, "bytes": nbytes, "GB_per_s": nbytes / seconds / 1e9,
           "fraction_of_copy_bandwidth": nbytes / seconds / copy_bandwidth()}
    if provider == "compiled":
        device_s, why = None, "not tried for torch.compile rows"
    else:
        device_s, why = _device_time(fn) if capturable else (None, "not capturable: it synchronises")
    if device_s is not None:
        row.update(device_ms=device_s * 1e3, device_fraction_of_copy_bandwidth=nbytes / device_s / copy_bandwidth())
    else:
        row["device_ms"] = None
        row["device_ms_why_not"] = why
    benchmark.extra_info.update(row)
    RESULTS.append(row)


def provider_fn(provider: str, kernel_fn, twin_fn):
    if provider in VARIANTS:  # the triton kernels, run in a variant set around the whole call (see run)
        return provider_fn("triton", kernel_fn, twin_fn)
    if provider == "triton":
        if not kernels.AVAILABLE:
            pytest.skip("triton is not installed")
        if not CUDA and not kernels.is_interpreted(kgather._move_rows_kernel):
            pytest.skip("no GPU and TRITON_INTERPRET was not 1 at import: the kernels cannot run here")
        return kernel_fn
    if provider == "compiled":
        if not CUDA:
            pytest.skip("compiled: CUDA only (Inductor on CPU adds ~20 s of C++ compilation per op)")
        return torch.compile(twin_fn)
    return twin_fn


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if os.environ.get("D2V_BENCH_WRITE", "0") != "1" or not RESULTS:
        return
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    import triton

    doc = {"benchmark": "kernels", "device": name, "torch": torch.__version__,
           "triton": getattr(triton, "__version__", None),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "copy_GB_per_s": SESSION.get("copy_Bps", 0) / 1e9, "results": RESULTS}
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"kernels-{slug}.json").write_text(json.dumps(doc, indent=2) + "\n")


# ----------------------------------------------------------------------------- inputs
def make_mask(B: int, T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(B, T, generator=g) < MASK_PROB).to(DEVICE)


def make_clone_mask(B: int, clones: int, T: int) -> torch.Tensor:
    """``[B*clones, T]``, exactly ``int(MASK_PROB_V2 * T)`` random positions per row."""
    g = torch.Generator().manual_seed(0)
    rank = torch.rand(B * clones, T, generator=g).argsort(dim=1).argsort(dim=1)
    return (rank < int(MASK_PROB_V2 * T)).to(DEVICE)


def randn(*shape, dtype=DTYPE):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


PROVIDERS = ["triton", "triton+custom_op", "eager", "compiled"]


# ----------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_gather(benchmark, provider):
    s = shape_for(provider)
    B, T, C = s["B"], s["T"], s["C"]
    fn = provider_fn(provider, kgather.masked_gather, twin.masked_gather)
    x, mask = randn(B, T, C), make_mask(B, T)
    N = int(mask.sum())
    run(benchmark, "masked_gather", provider, lambda: fn(x, mask), 2 * N * C * x.element_size(), s)


@pytest.mark.parametrize("provider", ["triton", "eager"])
def test_masked_gather_counted(benchmark, provider):
    """The gather as the step runs it with ``--train.host_counts``: N given by the caller, so
    nothing waits for the device (and the call can be captured in a CUDA graph)."""
    s = shape_for(provider)
    B, T, C = s["B"], s["T"], s["C"]
    fn = provider_fn(provider, kgather.masked_gather, twin.masked_gather)
    x, mask = randn(B, T, C), make_mask(B, T)
    N = int(mask.sum())
    run(benchmark, "masked_gather_counted", provider, lambda: fn(x, mask, N), 2 * N * C * x.element_size(), s,
        capturable=True)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_scatter(benchmark, provider):
    s = shape_for(provider)
    B, T, C = s["B"], s["T"], s["C"]
    fn = provider_fn(provider, kgather.masked_scatter, twin.masked_scatter)
    mask = make_mask(B, T)
    N = int(mask.sum())
    rows, fill = randn(N, C), randn(C)
    run(benchmark, "masked_scatter", provider, lambda: fn(rows, mask, fill), (N + B * T) * C * rows.element_size(), s,
        capturable=provider.startswith("triton"))  # eager: out[mask] = rows counts on the host


TARGET_PROVIDERS = ["triton", "triton_split", "triton+custom_op", "eager", "compiled"]


@pytest.mark.parametrize("counted", [False, True], ids=["", "counted"])
@pytest.mark.parametrize("provider", TARGET_PROVIDERS)
def test_build_targets(benchmark, provider, counted):
    """data2vec v1 text: top-10 layers, instance norm, mean, no final norm, masked rows;
    ``counted``: with the masked-row count given (``--train.host_counts``: no sync)."""
    if counted and provider in ("triton+custom_op", "compiled"):
        pytest.skip("counted rows: triton, triton_split and eager")
    s = shape_for(provider)
    K, B, T, C = s["K"], s["B"], s["T"], s["C"]
    fn = provider_fn(provider, ktargets.build_targets, twin.build_targets)
    layers = [randn(B, T, C) for _ in range(K)]
    mask = make_mask(B, T)
    N = int(mask.sum())
    nbytes = K * B * T * C * layers[0].element_size() + N * C * 4
    if counted:
        run(benchmark, "build_targets_counted", provider, lambda: fn(layers, mask=mask, count=N), nbytes, s,
            capturable=True)
    else:
        run(benchmark, "build_targets", provider, lambda: fn(layers, mask=mask), nbytes, s)


@pytest.mark.parametrize("provider", ["triton", "triton_split", "eager"])
def test_build_targets_speech(benchmark, provider):
    """data2vec speech base (docs/speech.md): top-8 layers, instance norm over T = 999 frames (20 s
    crops), 8 utterances, ~48% of the frames masked (1 - exp(-0.65)), count given. The long
    time axis leaves the one-pass kernel 8-channel (16-byte) tiles: the split method's case."""
    if CUDA:
        K, B, T, C = 8, 8, 999, 768
    else:
        K, B, T, C = (2, 2, 40, 16) if provider.startswith("triton") else (3, 4, 200, 64)
    s = dict(K=K, B=B, T=T, C=C)
    fn = provider_fn(provider, ktargets.build_targets, twin.build_targets)
    layers = [randn(B, T, C) for _ in range(K)]
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(B, T, generator=g) < 0.48).to(DEVICE)
    N = int(mask.sum())
    nbytes = K * B * T * C * layers[0].element_size() + N * C * 4
    run(benchmark, "build_targets_speech", provider, lambda: fn(layers, mask=mask, count=N), nbytes, s,
        capturable=True)


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_gather_clones(benchmark, provider, direction):
    """data2vec 2.0 student input: the kept (unmasked, 52%) rows of every clone, gathered
    from ``x[B, T, C]`` with a ``[B*clones, T]`` mask; ``fwd_bwd`` adds the backward (the
    clones' gradients summed into ``[B, T, C]``)."""
    s = shape_for_clones(provider)
    B, clones, T, C = s["B"], s["clones"], s["T"], s["C"]
    fn = provider_fn(provider, kgather.masked_gather, twin.masked_gather)
    keep = ~make_clone_mask(B, clones, T)
    N = int(keep.sum())
    used = int(keep.view(B, clones, T).any(dim=1).sum())  # sample rows some clone keeps
    x = randn(B, T, C)
    e = x.element_size()
    if direction == "fwd":
        call, nbytes = (lambda: fn(x, keep)), (used + N) * C * e  # each used row read once, N written
    else:
        x.requires_grad_()
        grad = randn(N, C)

        def call():
            return torch.autograd.grad(fn(x, keep), x, grad)

        nbytes = (used + N) * C * e + (N + B * T) * C * e  # + read the N gradient rows, write grad_x
    run(benchmark, f"masked_gather_clones_{direction}", provider, call, nbytes, s)


@pytest.mark.parametrize("provider", TARGET_PROVIDERS)
def test_build_targets_clones(benchmark, provider):
    """data2vec 2.0 text: top-12 layers, instance norm, mean, no final norm, at the masked
    rows of all 8 clones (targets computed once per sample)."""
    s = shape_for_clones(provider)
    K, B, clones, T, C = s["K"], s["B"], s["clones"], s["T"], s["C"]
    fn = provider_fn(provider, ktargets.build_targets, twin.build_targets)
    layers = [randn(B, T, C) for _ in range(K)]
    mask = make_clone_mask(B, clones, T)
    N = int(mask.sum())
    nbytes = K * B * T * C * layers[0].element_size() + N * C * 4
    run(benchmark, "build_targets_clones", provider, lambda: fn(layers, mask=mask), nbytes, s)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_regression_loss_fwd_bwd(benchmark, provider):
    """Smooth L1 (beta 4) at the masked rows, forward + backward to pred."""
    s = shape_for(provider)
    C = s["C"]
    N = int(make_mask(s["B"], s["T"]).sum())
    fn = provider_fn(provider, kloss.regression_loss, twin.regression_loss)
    pred = randn(N, C).requires_grad_()
    target = randn(N, C, dtype=torch.float32)

    def step():
        return torch.autograd.grad(fn(pred, target, beta=BETA), pred)

    nbytes = N * C * (2 * pred.element_size() + 4)  # read pred and target, write the gradient
    run(benchmark, "regression_loss_fwd_bwd", provider, step, nbytes, s, capturable=True)


EMA_PROVIDERS = ["triton", "triton_lists", "eager", "compiled", "foreach_lerp", "loop"]


@pytest.mark.parametrize("student_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", EMA_PROVIDERS)
def test_ema_update(benchmark, provider, student_dtype):
    """One EMA step over a RoBERTa-base layer stack: `triton` on two flat buffers
    (flatten_params_), `triton_lists` on separate tensors (multi-tensor kernel), `eager` the
    twin (torch._foreach), `foreach_lerp` torch._foreach_lerp_, `loop` the per-parameter
    mul_/add_ of d2v_fast/reference/data2vec.py."""
    s = shape_for("triton" if provider.startswith("triton") else provider)
    sdt = torch.bfloat16 if student_dtype == "bf16" else torch.float32
    if not CUDA and provider not in ("triton", "triton_lists", "eager", "loop"):
        pytest.skip(f"{provider}: CUDA only")
    if not CUDA and provider.startswith("triton") and student_dtype == "bf16":
        pytest.skip("CPU smoke run: fp32 only")
    shapes = roberta_layer_shapes(s["C"], s["ffn"], s["layers"])
    teacher = [torch.randn(sh, device=DEVICE) for sh in shapes]
    student = [torch.randn(sh, device=DEVICE).to(sdt) for sh in shapes]
    n = sum(t.numel() for t in teacher)
    decay = 0.9999  # what the trainer passes (a float: no device read either way)
    if provider == "triton":
        provider_fn("triton", None, None)
        t_flat, s_flat = kema.flatten_params_(teacher), kema.flatten_params_(student)
        fn = lambda: kema.ema_update_(t_flat, s_flat, decay)  # noqa: E731
    elif provider == "triton_lists":
        provider_fn("triton", None, None)
        fn = lambda: kema.ema_update_(teacher, student, decay)  # noqa: E731
    elif provider == "foreach_lerp":
        if sdt != torch.float32:
            pytest.skip("torch._foreach_lerp_ needs one dtype on both sides")
        fn = lambda: torch._foreach_lerp_(teacher, student, 1 - decay)  # noqa: E731
    elif provider == "loop":
        def fn():
            for t, st in zip(teacher, student):
                t.mul_(decay)
                t.add_(st, alpha=1 - decay)
    else:
        twin_fn = provider_fn(provider, None, twin.ema_update_)
        fn = lambda: twin_fn(teacher, student, decay)  # noqa: E731
    s = {**s, "parameters": n, "student": student_dtype}
    run(benchmark, f"ema_update_{student_dtype}", provider, fn, n * (8 + student[0].element_size()), s, capturable=True)


@pytest.mark.parametrize("provider", ["triton", "eager"])
def test_layer_norm_dual(benchmark, provider):
    """A post-LN block's LayerNorm with its bf16 copy for the next Linear (``ops.layer_norm_dual``,
    forward): `triton` one kernel writing both outputs and the statistics, `eager`
    ``native_layer_norm`` then autocast's cast (two kernels)."""
    s = shape_for(provider)
    x = torch.randn(s["B"], s["T"], s["C"], device=DEVICE)
    w, b = torch.randn(s["C"], device=DEVICE), torch.randn(s["C"], device=DEVICE)
    fn = provider_fn(provider, lambda: knorm.layer_norm_dual_fwd(x, w, b, 1e-5, torch.bfloat16),
                     lambda: twin.layer_norm_dual_fwd(x, w, b, 1e-5, torch.bfloat16))
    n = x.numel()
    run(benchmark, "layer_norm_dual", provider, fn, nbytes=n * (4 + 4 + 2), shape=s, capturable=True)


@pytest.mark.parametrize("provider", ["triton", "eager"])
def test_layer_norm_dual_residual(benchmark, provider):
    """The teacher's post-LN LayerNorm with the block's residual add (no backward, no
    statistics): `triton` one kernel reading the fp32 stream and the bf16 branch and writing
    both outputs, `eager` the add, ``native_layer_norm`` and autocast's cast (three kernels)."""
    s = shape_for(provider)
    x = torch.randn(s["B"], s["T"], s["C"], device=DEVICE)
    r = torch.randn(s["B"], s["T"], s["C"], device=DEVICE).to(torch.bfloat16)
    w, b = torch.randn(s["C"], device=DEVICE), torch.randn(s["C"], device=DEVICE)
    fn = provider_fn(provider, lambda: knorm.layer_norm_dual_fwd(x, w, b, 1e-5, torch.bfloat16, False, r),
                     lambda: twin.layer_norm_dual_fwd(x, w, b, 1e-5, torch.bfloat16, False, r))
    n = x.numel()
    run(benchmark, "layer_norm_dual_residual", provider, fn, nbytes=n * (4 + 2 + 4 + 2), shape=s, capturable=True)
