"""Performance switches of the training step: each computes the same step as the
default path. ``--train.skip_on_device`` (the non-finite skip decided on the device) and the
EMA store mask it relies on."""
import copy

import pytest
import torch

from d2v_fast import kernels, ops
from d2v_fast.data.text.corpus import open_corpus
from d2v_fast.config import validate
from d2v_fast.errors import UsageError
from d2v_fast.kernels import ema as kema
from d2v_fast.trainer import NonFiniteError, Trainer

from .helpers import small_cfg

# Every switch off: the baseline each switch is compared with (the defaults turn them all on).
OFF = dict(skip_on_device=False, host_counts=False, cast_once=False, fused_qkv=False, bf16_teacher=False,
           bf16_student=False)
INTERPRETED = kernels.AVAILABLE and kernels.is_interpreted(kema._ema_flat_kernel)


# ----------------------------------------------------------------------------- EMA store mask
@pytest.mark.parametrize("side", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="the Triton side on CPU needs TRITON_INTERPRET=1 before import"))])
@pytest.mark.parametrize("layout", ["flat", "lists", "mixed-dtypes"])
def test_ema_skip_flag_leaves_the_teacher_bitwise(side, layout):
    shapes = [(5, 3), (7,), (4097,), (1,)]
    if layout == "flat":
        t, s = [torch.randn(9001)], [torch.randn(9001)]
    else:
        t = [torch.randn(sh) for sh in shapes]
        s = [torch.randn(sh) for sh in shapes]
        if layout == "mixed-dtypes":
            s[1] = s[1].bfloat16()
    ops.set_kernels(side)
    try:
        for decay in (0.9, torch.tensor(0.75)):
            plain, kept, updated = [x.clone() for x in t], [x.clone() for x in t], [x.clone() for x in t]
            ops.ema_update_(plain, s, decay)
            ops.ema_update_(kept, s, decay, skip=torch.tensor(True))
            ops.ema_update_(updated, s, decay, skip=torch.tensor(False))
            for a, b in zip(kept, t):
                assert torch.equal(a, b)  # skipped: untouched
            for a, b in zip(updated, plain):
                assert torch.equal(a, b)  # not skipped: the very same update
            assert not torch.equal(plain[0], t[0])
    finally:
        ops.set_kernels("auto")


def test_ema_op_schema_with_skip():
    args = ([torch.randn(4), torch.randn(3)], [torch.randn(4), torch.randn(3)], None, 0.9, torch.tensor(True))
    torch.library.opcheck(kema.ema_update_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------- the step
def run_steps(cache, tmp_path, attempts, nan_at, settle=True, **train):
    cfg = small_cfg(cache, micro_batch_size=4, **{**OFF, **train})  # two micro-batches per update
    cfg.optim.warmup_steps = 2
    tr = Trainer(cfg, open_corpus(cache), tmp_path)
    tr._inject_nan = set(nan_at)
    stream = tr.batches()
    out = []
    for _ in range(attempts):
        m = tr.train_step(next(stream))
        finite = m["finite"] if m["finite"] is not None or not settle else tr.settle()
        out.append((float(m["loss"]), finite, tr.step, tr.skipped, m["lr"], m["ema_decay"]))
    tr.settle()
    return tr, out


def assert_same_state(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert (a.step, a.skipped, a.attempts, a.consecutive_skips) == (b.step, b.skipped, b.attempts, b.consecutive_skips)


def test_skip_on_device_matches_the_host_skip(builtin_cache, tmp_path):
    """NaN at the first attempt (before the optimizer has state) and in the middle: the same
    losses, counters, schedule, weights, teacher and optimizer state, bit for bit."""
    nan_at = {1, 4}
    a, ra = run_steps(builtin_cache, tmp_path / "host", 7, nan_at)
    b, rb = run_steps(builtin_cache, tmp_path / "device", 7, nan_at, skip_on_device=True)
    assert [r[1] for r in ra] == [False, True, True, False, True, True, True]
    same = lambda x, y: x == y or (x != x and y != y)  # NaN losses of the skipped attempts
    assert all(same(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(ra, rb)), (ra, rb)
    assert_same_state(a, b)


def test_deferred_flag_read_gives_the_same_updates(builtin_cache, tmp_path):
    """Without a settle between updates (the default loop's way: the host reads an update's
    flag in the next update, after its forward and backward are queued), every update takes
    the lr and EMA decay of the host-side skip, the counters follow one update behind, and
    after the last settle everything is the same bit for bit."""
    nan_at = {1, 4}
    a, ra = run_steps(builtin_cache, tmp_path / "host", 7, nan_at)
    b, rb = run_steps(builtin_cache, tmp_path / "device", 7, nan_at, settle=False, skip_on_device=True)
    same = lambda x, y: x == y or (x != x and y != y)
    assert all(same(x[0], y[0]) and x[4:] == y[4:] for x, y in zip(ra, rb)), (ra, rb)
    assert [r[1] for r in rb] == [None] * 7  # never read inside its own update
    # the counters seen after each update are the host path's of the update before
    assert [r[2:4] for r in rb[1:]] == [r[2:4] for r in ra[:-1]]
    assert_same_state(a, b)


def test_skip_on_device_keeps_the_skip_limit(builtin_cache, tmp_path):
    cfg = small_cfg(builtin_cache, max_steps=10, max_skipped_steps=2, skip_on_device=True)
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path)
    tr._inject_nan = {3, 4}
    with pytest.raises(NonFiniteError, match="2 updates in a row"):
        tr.fit()
    assert tr.step == 2 and tr.skipped == 2


@pytest.mark.parametrize("limit, nan_at", [(2, {3, 4}), (1, {3})])
def test_deferred_flag_read_keeps_the_skip_limit_between_logged_steps(builtin_cache, tmp_path, limit, nan_at):
    """Logging every 5 updates, the loop reads the flags late; it still stops after the same
    attempt at the same step as the host-side skip (a limit of 1: the update queued before the
    skip was found is not applied)."""
    done = []
    for name, on in (("host", False), ("device", True)):
        cfg = small_cfg(builtin_cache, max_steps=10, max_skipped_steps=limit, skip_on_device=on)
        cfg.train.log_every = 5
        tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path / name)
        tr._inject_nan = set(nan_at)
        with pytest.raises(NonFiniteError, match=f"{limit} updates in a row"):
            tr.fit()
        done.append(tr)
    a, b = done
    assert (b.step, b.skipped, b.attempts, b.position) == (a.step, a.skipped, a.attempts, a.position) == \
        (2, limit, 2 + limit, (2 + limit) * 8)
    assert_same_state(a, b)


def test_deferred_flag_read_fit_matches_the_host_skip(builtin_cache, tmp_path, capsys):
    """A whole run logging every 3 updates with two skipped attempts: the same records, the
    same skip reports and the same final state as reading each flag at once."""
    runs, errs = [], []
    for name, on in (("host", False), ("device", True)):
        cfg = small_cfg(builtin_cache, max_steps=8, skip_on_device=on, progress=True)
        cfg.train.log_every = 3
        tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path / name)
        tr._inject_nan = {2, 5}
        hist = tr.fit()
        out = capsys.readouterr()
        errs.append([l for l in (out.out + out.err).splitlines() if "update skipped" in l])
        runs.append((tr, [{k: v for k, v in r.items() if not k.endswith("_per_s") and "per_s_" not in k
                           and k != "mfu"} for r in hist]))
    (a, ha), (b, hb) = runs
    assert [r["step"] for r in ha] == [3, 6, 8] and ha == hb
    assert errs[0] == errs[1] and len(errs[0]) == 2 and "attempt 2:" in errs[0][0], errs
    assert (a.step, a.skipped, a.attempts) == (8, 2, 10)
    assert_same_state(a, b)


def test_skip_on_device_is_off_without_fused_adamw(builtin_cache, tmp_path):
    cfg = small_cfg(builtin_cache, skip_on_device=True)
    cfg.optim.fused = False
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path)
    assert tr.switches["skip_on_device"] is False and tr._flag_host is None
    cfg.optim.fused = True
    assert Trainer(cfg, open_corpus(builtin_cache), tmp_path / "fused").switches["skip_on_device"] is True


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_switches_compute_the_same_update(builtin_cache, tmp_path, dtype):
    """The defaults (every switch on where it applies, the EMA over the flat buffers) against
    every switch off: the same losses, weights and teacher after 3 updates of 2 micro-batches."""
    def run(out, **train):
        cfg = small_cfg(builtin_cache, max_steps=3, micro_batch_size=4, dtype=dtype, **train)
        cfg.model.num_layers, cfg.recipe.top_k = 2, 2
        tr = Trainer(cfg, open_corpus(builtin_cache), out)
        return [r["loss"] for r in tr.fit()], tr

    la, a = run(tmp_path / "defaults")
    lb, b = run(tmp_path / "off", **OFF)
    assert all(a.switches.values()) == (dtype == "bfloat16") and not any(b.switches.values())
    assert a._ema_flat is not None
    # fp32 (host counts, the skip on the device, the flat EMA): bit for bit. bf16 adds the fused
    # QKV GEMM, which rounds in another order than three separate ones: the last bits move
    tol = dict(rtol=0, atol=0) if dtype == "float32" else dict(rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(la, lb, **tol)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **tol, msg=k)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compiled_blocks_compute_the_same_step(builtin_cache, tmp_path):
    """``--train.compile blocks`` (dropout off: inductor draws its own dropout masks)."""
    def losses(**train):
        cfg = small_cfg(builtin_cache, batch_size=4, **{**OFF, **train})
        cfg.model.num_layers, cfg.recipe.top_k, cfg.data.seq_len = 1, 1, 32
        cfg.model.dropout = cfg.model.attention_dropout = 0.0
        tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path / str(train))
        state = copy.deepcopy(tr.model.state_dict())
        stream = tr.batches()
        return [float(tr.train_step(next(stream))["loss"]) for _ in range(2)], state, tr

    eager, s0, _ = losses()
    compiled, s1, tr = losses(compile="blocks")
    assert list(s0) == list(s1) and all(torch.equal(s0[k], s1[k]) for k in s0)  # same names, same init
    for step, (a, b) in enumerate(zip(eager, compiled), 1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: eager {a} compiled {b}"
    assert hasattr(tr.model.teacher[0], "_compiled_call_impl") and tr.model.teacher[0]._compiled_call_impl is not None


def test_cudagraph_blocks_are_compiled_blocks_off_the_gpu(builtin_cache, tmp_path):
    """``--train.compile blocks-cudagraphs`` compiles the same blocks; CUDA graphs only on a
    GPU (its step is compared with eager's in the gpu test below), so the CPU runs the
    blocks compiled as ``blocks`` does (tested above)."""
    cfg = small_cfg(builtin_cache, compile="blocks-cudagraphs")
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path)
    assert tr.cudagraphs is False
    assert all(getattr(b, "_compiled_call_impl", None) is not None
               for b in [*tr.model.student.blocks(), *tr._teacher_blocks()])
    cfg.train.compile = "graphs"
    with pytest.raises(UsageError, match="--train.compile 'graphs'.*none, blocks, blocks-cudagraphs"):
        validate(cfg)


# ----------------------------------------------------------------------------- fused QKV
def test_fused_qkv_layer_computes_the_same_and_keeps_hf_names():
    from d2v_fast.models import Encoder, EncoderConfig
    from d2v_fast.models.encoder import FusedSelfAttention, fuse_qkv_

    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_seq_len=16,
                        dropout=0.0, attention_dropout=0.0)
    plain = Encoder(cfg)
    fused = copy.deepcopy(plain)
    fuse_qkv_(fused.encoder.layer)
    assert isinstance(fused.encoder.layer[0].attention.self, FusedSelfAttention)
    assert not any(".query." in n for n, _ in fused.named_parameters())
    sa, sb = plain.state_dict(), fused.state_dict()
    assert list(sa) == list(sb) or sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(5, 50, (3, 11))
    x[2, 7:] = 1  # padded: the SDPA mask path too
    ya, yb = plain(x), fused(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for la, lb in zip(plain.encoder.layer, fused.encoder.layer):
        g = torch.cat([getattr(la.attention.self, p).weight.grad for p in ("query", "key", "value")])
        torch.testing.assert_close(lb.attention.self.qkv.weight.grad, g, rtol=1e-5, atol=1e-6)
    # loading either form into either model
    other = Encoder(cfg)
    fuse_qkv_(other.encoder.layer)
    other.load_state_dict(sa, strict=True)
    assert all(torch.equal(other.state_dict()[k], sa[k]) for k in sa)
    back = Encoder(cfg)
    back.load_state_dict(sb, strict=True)
    assert all(torch.equal(back.state_dict()[k], sa[k]) for k in sa)
    # the HF names resolve as attributes (torch.distributed.checkpoint walks them)
    q = fused.encoder.layer[1].attention.self.query.weight
    assert torch.equal(q, sa["encoder.layer.1.attention.self.query.weight"])


def test_a_module_swapped_after_a_forward_is_used_by_the_next():
    """Blocks keep their looked-up layout between calls; a module registered anywhere (here a
    Linear deep in a block, then the fused QKV swap) must reach the next forward."""
    from d2v_fast.models import Encoder, EncoderConfig
    from d2v_fast.models.encoder import fuse_qkv_

    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_seq_len=16,
                        dropout=0.0, attention_dropout=0.0)
    model = Encoder(cfg).eval()
    x = torch.randint(5, 50, (2, 9))
    before = model(x)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        new = torch.nn.Linear(64, 32)
        new.weight.normal_()
        model.encoder.layer[1].output.dense = new  # a swap two modules below the block
        reference.encoder.layer[1].output.dense = copy.deepcopy(new)
    after = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference(x), rtol=0, atol=0)
    fuse_qkv_(model.encoder.layer)  # the layout methods' other answer: the fused projection
    layer = model.encoder.layer[0]
    with torch.no_grad():
        layer.attention.self.qkv.weight.mul_(2.0)  # only the fused module's weights change
    assert layer._layout()[0] is layer.attention.self
    assert not torch.allclose(model(x), after)


def test_a_compiled_block_is_not_recompiled_when_modules_are_registered():
    """The layout cache's generation counter moves with every module registration in the
    process; a compiled block must not guard on it (it would recompile at each, and after
    dynamo's limit run eager), even when an eager call has filled the cache first."""
    from torch._dynamo.testing import CompileCounter

    from d2v_fast.models import Encoder, EncoderConfig

    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, max_seq_len=16,
                        dropout=0.0, attention_dropout=0.0)
    block = Encoder(cfg).eval().encoder.layer[0]
    h = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = block(h)[0]  # eager: the layout is cached
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(block, backend=counter)
        torch.testing.assert_close(compiled(h)[0], want, rtol=0, atol=0)
        frames = counter.frame_count
        for _ in range(3):
            torch.nn.Sequential(torch.nn.Linear(2, 2))  # registrations elsewhere in the process
            torch.testing.assert_close(compiled(h)[0], want, rtol=0, atol=0)
    torch._dynamo.reset()
    assert frames >= 1 and counter.frame_count == frames


def test_hooks_on_a_blocks_modules_still_run():
    """Blocks call their Linears' and norms' ``forward`` directly only while nothing hooks them:
    a hook registered after a forward (on one module, or on every module) runs at the next."""
    from d2v_fast.models import Encoder, EncoderConfig

    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_seq_len=16,
                        dropout=0.0, attention_dropout=0.0)
    model = Encoder(cfg).eval()
    x = torch.randint(5, 50, (2, 9))
    plain = model(x)
    seen = []
    handle = model.encoder.layer[1].output.dense.register_forward_hook(lambda m, i, o: seen.append(o) or o * 2)
    doubled = model(x)
    assert len(seen) == 1 and not torch.allclose(doubled, plain)
    handle.remove()
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    norms = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: norms.append(m) if isinstance(m, torch.nn.LayerNorm) else None)
    try:
        model(x)
    finally:
        handle.remove()
    assert len(norms) == 1 + 2 * cfg.num_layers  # the embeddings' and each block's two


def test_fused_qkv_training_step_checkpoint_and_export(builtin_cache, tmp_path):
    from d2v_fast import load_pretrained

    def run(out, **train):  # bf16 autocast: where the fused projection applies
        cfg = small_cfg(builtin_cache, max_steps=3, dtype="bfloat16", **{**OFF, **train})
        cfg.model.dropout = cfg.model.attention_dropout = 0.0
        tr = Trainer(cfg, open_corpus(builtin_cache), out)
        return [r["loss"] for r in tr.fit()], tr

    plain, _ = run(tmp_path / "plain")
    fused, tr = run(tmp_path / "fused", fused_qkv=True)
    assert tr.switches["fused_qkv"]
    for step, (a, b) in enumerate(zip(plain, fused), 1):  # bf16 products rounded in another order
        assert abs(a - b) <= 2e-3 * abs(a), f"step {step}: separate {a} fused {b}"
    from safetensors.torch import load_file

    enc = load_file(tmp_path / "fused" / "encoder.safetensors")
    assert "encoder.layer.0.attention.self.query.weight" in enc and not any("qkv" in k for k in enc)
    assert load_pretrained(tmp_path / "fused") is not None
    ckpt = sorted((tmp_path / "fused" / "checkpoints").glob("step-*"))[-1]
    tr2 = Trainer(tr.cfg, open_corpus(builtin_cache), tmp_path / "again")
    tr2.load(ckpt)  # the fused model resumes from its own checkpoint
    a, b = tr.model.state_dict(), tr2.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- on the GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                reason="needs CUDA with the kernels compiled (run with TRITON_INTERPRET=0)")


@pytest.mark.gpu
@needs_cuda
def test_skip_on_device_on_gpu(builtin_cache, tmp_path):
    """bf16 autocast, Triton kernels, CUDA fused AdamW: the same outcomes as the host skip, and
    a skipped attempt leaves student, teacher and optimizer state bit for bit."""
    def run(out, **train):
        cfg = small_cfg(builtin_cache, micro_batch_size=4, device="cuda", **{**OFF, **train})
        tr = Trainer(cfg, open_corpus(builtin_cache), out, device="cuda")
        tr._inject_nan = {1, 4}
        stream, rows = tr.batches(), []
        for attempt in range(1, 7):
            before = copy.deepcopy(tr.model.state_dict()) if attempt == 4 else None
            opt_before = copy.deepcopy(tr.optimizer.state_dict()) if attempt == 4 else None
            m = tr.train_step(next(stream))
            finite = m["finite"] if m["finite"] is not None else tr.settle()
            rows.append((finite, tr.step, tr.skipped, m["lr"]))
            if before is not None:
                after = tr.model.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before)
                st = tr.optimizer.state_dict()["state"]
                assert all(torch.equal(v, st[i][k]) for i, s in opt_before["state"].items() for k, v in s.items())
            elif finite:
                rows[-1] += (float(m["loss"]),)
        return rows

    host, device = run(tmp_path / "host"), run(tmp_path / "device", skip_on_device=True)
    assert [r[:4] for r in host] == [r[:4] for r in device]
    for a, b in zip(host, device):
        if len(a) > 4:
            assert abs(a[4] - b[4]) <= 1e-3 * abs(a[4]), (a, b)


@pytest.mark.gpu
@needs_cuda
def test_all_switches_on_gpu_compute_the_same_losses(builtin_cache, tmp_path):
    def losses(out, **train):
        cfg = small_cfg(builtin_cache, max_steps=4, device="cuda", **{**OFF, **train})
        cfg.model.num_layers, cfg.recipe.top_k = 2, 2
        cfg.model.dropout = cfg.model.attention_dropout = 0.0
        return [r["loss"] for r in Trainer(cfg, open_corpus(builtin_cache), out, device="cuda").fit()]

    plain = losses(tmp_path / "plain")
    for compiled in ("blocks", "blocks-cudagraphs"):
        fast = losses(tmp_path / compiled, skip_on_device=True, host_counts=True, compile=compiled, fused_qkv=True,
                      bf16_teacher=True, micro_batch_size=4)  # two micro-batches: each graph replays twice a step
        for step, (a, b) in enumerate(zip(plain, fast), 1):
            assert abs(a - b) <= 1e-2 * abs(a), f"step {step}: defaults {a} all switches ({compiled}) {b}"


# ----------------------------------------------------------------------------- bf16 teacher copy
@pytest.mark.parametrize("side", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="the Triton side on CPU needs TRITON_INTERPRET=1 before import"))])
@pytest.mark.parametrize("layout", ["flat", "lists"])
def test_ema_writes_the_shadow_copy(side, layout):
    shapes = [(5, 3), (7,), (4097,), (1,)]
    t = [torch.randn(9001)] if layout == "flat" else [torch.randn(sh) for sh in shapes]
    s = [torch.randn(x.shape) for x in t]
    shadow = torch.cat([x.reshape(-1) for x in t]).bfloat16()
    plain = [x.clone() for x in t]
    ops.set_kernels(side)
    try:
        ops.ema_update_(plain, s, 0.9)
        ops.ema_update_(t, s, 0.9, shadow=shadow)
        assert all(torch.equal(a, b) for a, b in zip(t, plain))  # the teacher update is unchanged
        want = torch.cat([x.reshape(-1) for x in t]).bfloat16()  # round to nearest even, as autocast casts
        assert torch.equal(shadow, want)
        ops.ema_update_(t, s, 0.9, skip=torch.tensor(True), shadow=shadow)
        assert torch.equal(shadow, want)
        if side == "triton":
            with pytest.raises(ValueError, match="shadow is"):
                ops.ema_update_(t, s, 0.9, shadow=shadow[1:])
    finally:
        ops.set_kernels("auto")


def test_bf16_teacher_computes_the_same_step(builtin_cache, tmp_path):
    """bf16 autocast on the CPU: the teacher reads the EMA's bf16 copy instead of casting its
    fp32 weights, and every loss is bit for bit the same; a checkpoint load refreshes the copy."""
    from d2v_fast.models.encoder import ShadowedLinear

    def run(out, **train):
        cfg = small_cfg(builtin_cache, max_steps=3, dtype="bfloat16", **{**OFF, **train})
        tr = Trainer(cfg, open_corpus(builtin_cache), out)
        return [r["loss"] for r in tr.fit()], tr

    plain, _ = run(tmp_path / "plain")
    shadowed, tr = run(tmp_path / "shadow", bf16_teacher=True)
    assert plain == shadowed
    lin = tr.model.teacher[0].intermediate.dense
    assert isinstance(lin, ShadowedLinear) and torch.equal(lin.weight_shadow, lin.weight.detach().bfloat16())
    assert not any("shadow" in k for k in tr.model.state_dict())
    tr2 = Trainer(tr.cfg, open_corpus(builtin_cache), tmp_path / "again")
    tr2.load(sorted((tmp_path / "shadow" / "checkpoints").glob("step-*"))[-1])
    lin2 = tr2.model.teacher[0].intermediate.dense
    assert torch.equal(lin2.weight_shadow, lin.weight_shadow) and torch.equal(tr2._teacher_shadow, tr._teacher_shadow)


def test_bf16_student_computes_the_same_update(builtin_cache, tmp_path):
    """bf16 autocast on the CPU, 2 micro-batches: the student's block Linears read the bf16
    copy kept by the update (``_ShadowLinearFn``) instead of autocast's casts; every loss,
    weight, teacher value and optimizer moment bit for bit the same, and a resumed run reads
    a fresh copy."""
    from d2v_fast.models.encoder import DualLayerNorm, ShadowedLinear

    def run(out, steps=3, **train):
        cfg = small_cfg(builtin_cache, max_steps=steps, micro_batch_size=4, dtype="bfloat16", **{**OFF, **train})
        cfg.model.num_layers, cfg.recipe.top_k = 2, 2
        tr = Trainer(cfg, open_corpus(builtin_cache), out)
        return [r["loss"] for r in tr.fit()], tr

    la, a = run(tmp_path / "autocast")
    lb, b = run(tmp_path / "copy", bf16_student=True)
    layer = b.model.student.encoder.encoder.layer[0]
    assert b.switches["bf16_student"] and isinstance(layer.intermediate.dense, ShadowedLinear)
    # the student's LayerNorms stay ATen's (the teacher's hand their bf16 rounding on): the Linear
    # after each casts its input, one op less of host work per norm than the dual norm's launch
    norms = (layer.output.LayerNorm, layer.attention.output.LayerNorm)
    assert all(type(n) is torch.nn.LayerNorm for n in norms) and not any(isinstance(n, DualLayerNorm) for n in norms)
    assert la == lb
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    assert torch.equal(b._student_shadow, b._ema_flat[1].to(torch.bfloat16))
    # resume: the copy is refreshed from the loaded weights
    c = Trainer(b.cfg, open_corpus(builtin_cache), tmp_path / "resumed")
    c.load(sorted((tmp_path / "copy" / "checkpoints").glob("step-*"))[-1])
    assert torch.equal(c._student_shadow, c._ema_flat[1].to(torch.bfloat16))


@pytest.mark.parametrize("modality,recipe", [("audio", "data2vec"), ("audio", "data2vec2"), ("images", "data2vec"),
                                             ("images", "data2vec2")])
def test_bf16_copies_compute_the_same_speech_and_image_updates(modality, recipe):
    """bf16 autocast on the CPU, the tiny speech and image models on synthetic batches, 3
    updates of 2 micro-batches: with the bf16 copies of the student's and the teacher's block
    Linears (and the LayerNorms handing over their rounding) every loss, weight, teacher value
    and optimizer moment is bit for bit autocast's."""
    from d2v_fast import cost
    from d2v_fast.models.encoder import ShadowedLinear

    def run(**train):
        cfg = cost.cost_config(modality, recipe, "tiny", **train)
        torch.manual_seed(0)
        step, batch = cost._make("d2v_fast", cfg, torch.device("cpu"), 1024)
        tr = step.trainer
        losses = []
        for _ in range(3):
            losses.append(float(tr.train_step([batch, batch])["loss"]))
            tr.settle()
        return losses, tr

    la, a = run(bf16_teacher=False, bf16_student=False)
    lb, b = run()
    assert b.switches["bf16_teacher"] and b.switches["bf16_student"] and not a.switches["bf16_student"]
    assert all(isinstance(lin, ShadowedLinear) for blk in (b.model.student.blocks()[0], b._teacher_blocks()[0])
               for lin in blk.qkv_projections())
    assert not any(lin.sole_reader for lin in b.model.student.blocks()[0].qkv_projections())  # one input, three readers
    assert la == lb
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)


def test_bf16_teacher_and_cast_once_only_with_bf16_autocast(builtin_cache, tmp_path):
    tr = Trainer(small_cfg(builtin_cache), open_corpus(builtin_cache), tmp_path)
    assert not any(tr.switches[k] for k in ("bf16_teacher", "bf16_student", "cast_once", "fused_qkv"))
    assert tr._teacher_shadow is None and tr._student_shadow is None
    tr = Trainer(small_cfg(builtin_cache, dtype="bfloat16"), open_corpus(builtin_cache), tmp_path / "bf16")
    assert all(tr.switches[k] for k in ("bf16_teacher", "bf16_student", "cast_once", "fused_qkv"))
    assert tr._teacher_shadow is not None and tr._student_shadow is not None


# ----------------------------------------------------------------------------- attention backend
def test_pinned_attention_backend_computes_the_same_step(builtin_cache, tmp_path):
    """``--train.attention math`` against PyTorch's own pick: the same losses for three
    updates (pack mode: no padding mask; no attention dropout, whose masks differ by backend)."""
    def losses(attention):
        cfg = small_cfg(builtin_cache, batch_size=4, attention=attention)
        cfg.model.num_layers, cfg.recipe.top_k, cfg.data.seq_len, cfg.data.block_mode = 2, 2, 32, "pack"
        cfg.model.attention_dropout = 0.0
        tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path / attention)
        stream = tr.batches()
        return [float(tr.train_step(next(stream))["loss"]) for _ in range(3)]

    assert losses("math") == pytest.approx(losses("auto"), rel=1e-5, abs=1e-6)


def test_attention_backend_the_device_lacks_is_refused(builtin_cache, tmp_path):
    cfg = small_cfg(builtin_cache, attention="cudnn")  # cuDNN attention is CUDA only
    with pytest.raises(UsageError, match="--train.attention cudnn: not available on cpu"):
        Trainer(cfg, open_corpus(builtin_cache), tmp_path)


# ----------------------------------------------------------------------------- one cast per update
def test_cast_once_casts_the_student_weights_once_per_update(builtin_cache, tmp_path):
    """bf16 autocast, two micro-batches per update: ``--train.cast_once`` makes the bf16
    copies of the student's weights once per update instead of once per micro-batch, and
    the update is the same, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self, params):
            super().__init__()
            self.ptrs, self.n = {p.data_ptr() for p in params}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 \
                    and args[0].data_ptr() in self.ptrs:
                self.n += 1
            return func(*args, **kwargs)

    def run(cast_once):
        cfg = small_cfg(builtin_cache, batch_size=4, micro_batch_size=2, dtype="bfloat16", **{**OFF, "cast_once": cast_once})
        cfg.model.num_layers, cfg.recipe.top_k, cfg.data.seq_len = 2, 2, 32
        tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path / str(cast_once))
        stream = tr.batches()
        weights = [p for n, p in tr.model.student.named_parameters() if n.endswith("weight") and p.ndim == 2]
        with CountWeightCasts(weights) as counter:
            losses = [float(tr.train_step(next(stream))["loss"]) for _ in range(2)]
        return losses, counter.n, tr.model.state_dict()

    per_micro, n_per_micro, s0 = run(False)
    once, n_once, s1 = run(True)
    assert n_once > 0 and n_per_micro == 2 * n_once  # two micro-batches: half the casts
    assert once == per_micro
    assert all(torch.equal(s0[k], s1[k]) for k in s0)



# ----------------------------------------------------------------------------- micro-batch size
def test_largest_fitting_divisor():
    from d2v_fast.autobatch import largest_fitting_divisor

    tried = []

    def fits(m):
        tried.append(m)
        return m <= 10

    assert largest_fitting_divisor(48, fits) == 8 and tried == [48, 24, 16, 12, 8]
    assert largest_fitting_divisor(7, lambda m: m < 7) == 1
    assert largest_fitting_divisor(6, lambda m: False) == 1


def test_trial_step_leaves_no_trace(builtin_cache, tmp_path):
    """The automatic micro-batch size (CUDA) is found by trial steps on real micro-batches;
    a trial must not change the run: the same weights, no gradients, no optimizer state, the
    same RNG stream, and then the same losses as a run without it."""
    runs = []
    for name, trial in (("plain", False), ("trial", True)):
        tr = Trainer(small_cfg(builtin_cache, max_steps=3), open_corpus(builtin_cache), tmp_path / name)
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        rng = torch.get_rng_state()
        if trial:
            assert tr.trial_step(4) is None  # no peak-memory counter on the CPU
            assert torch.equal(torch.get_rng_state(), rng)
            assert all(p.grad is None for p in tr.model.student.parameters())
            assert not tr.optimizer.state
            assert all(torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
        stream = tr.batches()
        runs.append([float(tr.train_step(next(stream))["loss"]) for _ in range(3)])
    assert runs[0] == runs[1]


@pytest.mark.gpu
@needs_cuda
def test_automatic_micro_batch_on_gpu(builtin_cache, tmp_path, monkeypatch):
    """On a GPU the default micro-batch is the largest divisor of the share that fits: all of
    it for a tiny model, and a smaller divisor when the memory budget says so."""
    cfg = small_cfg(builtin_cache, device="cuda", batch_size=8)
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path / "fits", device="cuda")
    assert tr.micro_batch_auto and (tr.micro_batch_size, tr.accum) == (8, 1)
    peaks = {m: tr.trial_step(m) for m in (8, 4)}
    assert peaks[4] < peaks[8]
    budget = (peaks[4] + peaks[8]) / 2 / torch.cuda.get_device_properties(0).total_memory
    assert tr.fit_micro_batch(8, budget=budget) == 4
    stream = tr.batches()
    assert torch.isfinite(torch.as_tensor(float(tr.train_step(next(stream))["loss"])))


# ----------------------------------------------------------------------------- host counts
@pytest.mark.parametrize("side", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="the Triton side on CPU needs TRITON_INTERPRET=1 before import"))])
@pytest.mark.parametrize("clones", [1, 3])
@pytest.mark.parametrize("density", [0.0, 0.37, 1.0])
def test_counted_gather_and_targets_match_the_synced_ones(side, clones, density):
    """``--train.host_counts``: with the true count given, masked_gather (forward and backward)
    and build_targets compute what they compute when they read the count from the device."""
    B, T, C = 3, 17, 5
    x = torch.randn(B, T, C, requires_grad=True)
    mask = torch.rand(clones * B, T) < density
    n = int(mask.sum())
    layers = [torch.randn(B, T, C) for _ in range(3)]
    ops.set_kernels(side)
    try:
        synced = ops.masked_gather(x, mask)
        counted = ops.masked_gather(x, mask, n)
        assert counted.shape == (n, C)
        assert torch.equal(synced, counted)
        g = torch.randn(n, C)
        (ga,) = torch.autograd.grad(synced, x, g, allow_unused=True, materialize_grads=True)
        (gb,) = torch.autograd.grad(counted, x, g, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)  # clones: sums in another order
        for norms in (("instance", None), ("layer", "layer"), ("instance", "instance"), (None, "layer")):
            kw = dict(mask=mask, layer_norm=norms[0], final_norm=norms[1])
            want, got = ops.build_targets(layers, **kw), ops.build_targets(layers, count=n, **kw)
            assert got.shape == (n, C)
            assert torch.equal(want, got), norms
        if n:  # a count that disagrees with the mask is refused, not read past the rows
            with pytest.raises(RuntimeError, match="count differs"):
                ops.masked_gather(x, mask, n - 1)
            with pytest.raises(RuntimeError, match="count differs"):
                ops.build_targets(layers, mask=mask, count=n - 1, layer_norm="layer", final_norm=None)
    finally:
        ops.set_kernels("auto")


@pytest.mark.parametrize("recipe", ["data2vec", "data2vec2"])
def test_host_counts_compute_the_same_step(builtin_cache, tmp_path, recipe):
    def run(out, **train):
        cfg = small_cfg(builtin_cache, recipe=recipe, seq_len=32, micro_batch_size=4, **{**OFF, **train})
        cfg.model.num_layers, cfg.recipe.top_k, cfg.optim.warmup_steps = 2, 2, 2
        tr = Trainer(cfg, open_corpus(builtin_cache), out)
        stream = tr.batches()
        return [float(tr.train_step(next(stream))["loss"]) for _ in range(3)], tr

    synced, _ = run(tmp_path / "synced")
    counted, tr = run(tmp_path / "counted", host_counts=True)
    mb = next(tr.batches())[0]
    extra = tr._with_host_counts(mb)
    assert extra["mask_rows"] == int(mb["mask"].sum()) > 0
    assert extra["kept"] == int((~mb["mask"][0]).sum())
    for step, (a, b) in enumerate(zip(synced, counted), 1):
        assert abs(a - b) <= 1e-6 * abs(a), f"step {step}: synced {a} host counts {b}"


@pytest.mark.gpu
@needs_cuda
def test_host_counts_take_syncs_out_of_the_step_on_gpu(builtin_cache, tmp_path):
    """Counted by CUDA's sync debug mode over one update (after a warm-up one): fewer
    synchronising calls with ``--train.host_counts``; the numbers are printed for the log."""
    import warnings

    def syncs(out, **train):
        cfg = small_cfg(builtin_cache, micro_batch_size=4, device="cuda", **{**OFF, "skip_on_device": True, **train})
        tr = Trainer(cfg, open_corpus(builtin_cache), out, device="cuda")
        stream = tr.batches()
        tr.train_step(next(stream))
        batch = next(stream)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tr.train_step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    synced, counted = syncs(tmp_path / "synced"), syncs(tmp_path / "counted", host_counts=True)
    print(f"synchronising calls in one update of 2 micro-batches: {synced} by default, {counted} with host counts")
    assert counted < synced


def test_shadowed_linear_fp32_gradients_on_the_gpu_path(monkeypatch):
    """On a GPU a shadowed Linear's weight and bias gradients leave their GEMM and their sum in
    fp32 (one op each, no rounding to bf16 and cast back). On the CPU: the bias path (a sum with
    ``dtype=``) is closer to a float64 recomputation than autocast's rounded one, and the weight
    path falls back to autocast's arithmetic, where ``mm`` has no ``out_dtype``."""
    from d2v_fast.models import encoder

    torch.manual_seed(0)
    g2 = (torch.randn(4000, 40) * 3).to(torch.bfloat16)
    x2 = torch.randn(4000, 24).to(torch.bfloat16)
    exact_b = g2.double().sum(0)
    monkeypatch.setattr(encoder, "_fp32_grads", lambda t: False)
    b_auto, w_auto = encoder._bias_grad(g2, torch.float32), encoder._weight_grad(g2, x2, torch.float32)
    assert torch.equal(b_auto, g2.sum(0).float()) and torch.equal(w_auto, g2.t().mm(x2).float())
    monkeypatch.setattr(encoder, "_fp32_grads", lambda t: True)
    monkeypatch.setattr(encoder, "_MM_OUT_DTYPE", [])
    b_gpu, w_gpu = encoder._bias_grad(g2, torch.float32), encoder._weight_grad(g2, x2, torch.float32)
    assert b_gpu.dtype == w_gpu.dtype == torch.float32
    err = lambda a, e: float((a.double() - e).abs().max())
    assert err(b_gpu, exact_b) < err(b_auto, exact_b)
    assert encoder._MM_OUT_DTYPE == [False] and torch.equal(w_gpu, w_auto)  # the CPU's fallback


@pytest.mark.gpu
@needs_cuda
def test_shadowed_linear_fp32_weight_gradient_on_gpu():
    from d2v_fast.models import encoder

    g2 = torch.randn(4000, 40, device="cuda").to(torch.bfloat16)
    x2 = torch.randn(4000, 24, device="cuda").to(torch.bfloat16)
    exact = g2.double().t() @ x2.double()
    w = encoder._weight_grad(g2, x2, torch.float32)
    rounded = g2.t().mm(x2).float()
    assert w.dtype == torch.float32
    assert float((w.double() - exact).abs().max()) <= float((rounded.double() - exact).abs().max())
