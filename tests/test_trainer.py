"""The encoder, the data2vec recipe and the trainer: layout, parity with the eager
reference, resume, multi-process, bad flags, collapse guard and export."""
import copy
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from d2v_fast import load_pretrained
from d2v_fast import pretrain
from d2v_fast.checkpoint import load_checkpoint
from d2v_fast.config import preset
from d2v_fast.data.text.corpus import open_corpus
from d2v_fast.models import Encoder, EncoderConfig
from d2v_fast.recipes import RecipeConfig, build_model
from d2v_fast.reference.train import reference_losses
from d2v_fast.schedule import lr_factor
from d2v_fast.trainer import Trainer

from .helpers import losses, small_cfg, subprocess_env

SMALL = ["--train.probe_task", "none", "--config", "tiny", "--seq-len", "64", "--batch-size", "8", "--data.num_workers", "0",
         "--train.progress", "false", "--train.log_every", "1"]


# ------------------------------------------------------------------ model and recipe
def test_encoder_matches_transformers_data2vec():
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")
    cfg = EncoderConfig(vocab_size=97, hidden_size=48, num_layers=3, num_heads=4, ffn_size=80, max_seq_len=40)
    ours = Encoder(cfg).eval()
    hf_cfg = transformers.Data2VecTextConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
        max_position_embeddings=cfg.max_positions, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
        hidden_act="gelu")
    hf = transformers.Data2VecTextModel(hf_cfg, add_pooling_layer=False).eval()
    result = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert cfg.max_positions == 40 + 2
    x = torch.randint(4, 97, (3, 29))
    x[:, 0] = 0
    x[1, 17:] = 1
    x[2, 5:] = 1
    am = (x != 1).long()
    with torch.no_grad():
        a = ours(x, am)
        b = hf(input_ids=x, attention_mask=am).last_hidden_state
        c = ours(x)  # padding read off the pad id
    keep = am.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c[keep], a[keep])


def test_layer_returns_ffn_output_before_residual_and_norm():
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=16)
    enc = Encoder(cfg).eval()
    layer = enc.encoder.layer[0]
    h = torch.randn(2, 7, 32)
    out, ffn = layer(h)
    a = layer.attention
    B, T, C = h.shape
    q, k, v = (l(h).view(B, T, 2, 16).transpose(1, 2) for l in (a.self.query, a.self.key, a.self.value))
    att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    h1 = a.output.LayerNorm(h + a.output.dense(att.transpose(1, 2).reshape(B, T, C)))
    want_ffn = layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(h1)))
    torch.testing.assert_close(ffn, want_ffn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, layer.output.LayerNorm(h1 + want_ffn), rtol=1e-5, atol=1e-5)


def test_base_preset_builds_the_paper_model():
    """Every value of the preset is pinned in test_presets.py; here the model it builds."""
    cfg = preset("base")
    m, r = cfg.model, cfg.recipe
    with torch.device("meta"):
        model = build_model(dataclasses.replace(m, vocab_size=50265), r)
    n = model.student.encoder.num_params()
    assert 84e6 < n < 86e6  # ~85M non-embedding parameters (docs/design.md#flops)
    head = model.student.head
    assert [tuple(l.weight.shape) for l in head if isinstance(l, torch.nn.Linear)] == [(1536, 768), (768, 1536)]
    assert sum(p.numel() for p in model.teacher.parameters()) == n
    assert model.student.encoder.embeddings.position_embeddings.weight.shape[0] == 514


def test_ema_decay_schedule_and_lr_schedule():
    r = RecipeConfig(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10)
    assert r.decay_at(0) == pytest.approx(0.9) and r.decay_at(5) == pytest.approx(0.945)
    assert r.decay_at(10) == r.decay_at(10_000) == 0.99
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5) and lr_factor(100, 10, 100) == pytest.approx(0.0)
    assert lr_factor(500, 10, 100) == pytest.approx(0.0)


@pytest.mark.skipif(not hasattr(torch, "_fused_adamw_"), reason="this torch has no fused AdamW")
def test_list_adamw_is_torchs_fused_adamw_bit_for_bit():
    """Two groups (one with weight decay), odd sizes, a changing lr, a skipped step (found_inf),
    a missing gradient (torch's own step) and a state-dict round trip: parameters and state
    equal torch's fused AdamW bit for bit after every step."""
    from d2v_fast.schedule import ListAdamW

    shapes = [(5, 3), (7,), (4097,), (1,), (65, 33)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    make = lambda cls, P: cls([{"params": P[:3], "weight_decay": 0.05}, {"params": P[3:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.98), eps=1e-6, fused=True)
    a, b = make(torch.optim.AdamW, ps), make(ListAdamW, qs)
    for i in range(8):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        if i == 5:  # a parameter without a gradient this step
            ps[1].grad = qs[1].grad = None
        if i == 6:  # a checkpoint round trip mid-run
            b = make(ListAdamW, qs)
            b.load_state_dict(copy.deepcopy(a.state_dict()))
        for opt in (a, b):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 + i) / 8
            if i == 3:
                opt.found_inf = torch.tensor(1.0)
            opt.step()
            if i == 3:
                del opt.found_inf
        if i in (1, 2, 4, 7):
            assert b._lists is not None  # the cached lists took the step
            # each group's step counts are views of one vector, counted with one add
            for (params, _, _, steps, counts), group in zip(b._lists, b.param_groups):
                assert counts is not None and counts.shape == (len(group["params"]),)
                assert all(b.state[q]["step"]._base is counts for q in group["params"])
        if i == 7:  # 8 steps, one skipped (found_inf); the parameter that missed step 5 is one behind
            assert float(b.state[qs[1]]["step"]) == float(b.state[qs[0]]["step"]) - 1 == 6
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), i
            assert all(torch.equal(a.state[p][k], b.state[q][k]) for k in a.state[p]), i


def test_one_ema_step_per_update_with_accumulation(builtin_cache, tmp_path):
    cfg = small_cfg(builtin_cache, micro_batch_size=2)  # 4 micro-batches per update
    tr = Trainer(cfg, open_corpus(builtin_cache), tmp_path)
    teacher0 = [p.clone() for p in tr.model.teacher.parameters()]
    tr.train_step(next(tr.batches()))
    d = cfg.recipe.decay_at(0)
    for t0, t1, s in zip(teacher0, tr.model.teacher.parameters(), tr.model.student.encoder.encoder.layer.parameters()):
        torch.testing.assert_close(t1, d * t0 + (1 - d) * s.detach(), rtol=0, atol=1e-7)
    assert not any(p.requires_grad for p in tr.model.teacher.parameters())
    assert not tr.model.teacher.training and tr.model.student.training


def test_targets_exclude_padding_from_instance_norm():
    from d2v_fast.ops import build_targets

    x = torch.randn(2, 3, 9, 5)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 1:] = True
    y = build_targets(x, padding_mask=pad)
    for b in range(3):
        keep = ~pad[b]
        if keep.sum() == 1:  # one real position: normalised to 0
            want = torch.zeros(1, 5)
        else:
            want = sum(torch.nn.functional.instance_norm(x[k, b, keep].t()[None])[0].t() for k in range(2)) / 2
        torch.testing.assert_close(y[b, keep], want, rtol=1e-5, atol=1e-5)
    x2 = x.clone()
    x2[:, 1, 6:] = 1e3  # what sits under padding changes nothing
    torch.testing.assert_close(build_targets(x2, padding_mask=pad)[~pad], y[~pad])


# ------------------------------------------------------------------ parity with the reference
@pytest.mark.parametrize("micro", [0, 2], ids=["one-micro-batch", "accumulate-4"])
@pytest.mark.parametrize("block_mode", ["pack", "document"])
def test_engine_matches_reference_for_10_steps(builtin_cache, tmp_path, micro, block_mode):
    cfg = small_cfg(builtin_cache, micro_batch_size=micro, max_steps=10)
    cfg.data.block_mode = block_mode  # 'document' gives padded batches
    corpus = open_corpus(builtin_cache)
    tr = Trainer(cfg, corpus, tmp_path)
    state = copy.deepcopy(tr.model.state_dict())
    engine = [r["loss"] for r in tr.fit()]
    ref = reference_losses(cfg, corpus, 10, engine_state=state)
    assert len(engine) == len(ref) == 10
    for step, (a, b) in enumerate(zip(engine, ref), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: engine {a} reference {b}"
    assert engine[0] != engine[-1]


# ------------------------------------------------------------------ CLI, resume, processes
def run_cli(argv, capsys):
    rc = pretrain.main(argv)
    return rc, capsys.readouterr().err


def test_cli_run_writes_config_metrics_checkpoints_and_export(builtin_cache, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_cli(SMALL + ["--out", str(out), "--max-steps", "6", "--train.ckpt_every", "2",
                               "--train.keep_last", "2"], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 8 and cfg["model"]["vocab_size"] == 8192 and cfg["world_size"] == 1
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    for key in ("step", "loss", "lr", "ema_decay", "target_var", "pred_var", "tokens_per_s"):
        assert all(isinstance(r[key], (int, float)) for r in recs), key
    assert "mfu" not in recs[0]  # CPU
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    enc = load_pretrained(out)
    state = load_checkpoint(out / "checkpoints" / "step-00000006")
    x = torch.randint(5, 8192, (2, 20))
    x[1, 12:] = 1
    ref = Encoder(EncoderConfig(**state["encoder_config"])).eval()
    ref.load_state_dict({k[len("student.encoder."):]: v for k, v in state["model"].items()
                         if k.startswith("student.encoder.")})
    with torch.no_grad():
        torch.testing.assert_close(enc(x, (x != 1).long()), ref(x, (x != 1).long()))
        assert enc(x).shape == (2, 20, 128)
    assert isinstance(load_pretrained(out / "checkpoints" / "step-00000004"), Encoder)
    assert "loss" in err and "done: step 6" in err
    # the done line's speed is the median of every logged interval's, and says so
    median = statistics.median(r["tokens_per_s"] for r in recs)
    assert f", {median:,.0f} tokens/s (the median over 6 logging interval(s), steps 1-6);" in err, err


def test_stop_and_resume_is_bitwise_identical(builtin_cache, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    fixed = SMALL + ["--optim.total_steps", "8"]  # the same lr schedule whatever --max-steps says
    assert run_cli(fixed + ["--out", str(full), "--max-steps", "8"], capsys)[0] == 0
    assert run_cli(fixed + ["--out", str(part), "--max-steps", "4", "--train.ckpt_every", "4"], capsys)[0] == 0
    rc, err = run_cli(fixed + ["--out", str(part), "--max-steps", "8", "--resume"], capsys)
    assert rc == 0, err
    assert "resumed from" in err and "step 4" in err
    assert losses(part) == losses(full)  # exact float equality, every step
    a, b = load_file(str(full / "encoder.safetensors")), load_file(str(part / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the whole checkpoint too: weights, Adam moments, schedule, counters
    sa, sb = load_checkpoint(full / "checkpoints" / "step-00000008"), load_checkpoint(part / "checkpoints" / "step-00000008")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    for name, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][name][k]) for k, v in st.items()), name
    assert sa["scheduler"] == sb["scheduler"] and (sa["step"], sa["position"]) == (sb["step"], sb["position"])


def test_rerun_resumes_automatically_and_a_different_config_is_refused(builtin_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(SMALL + ["--out", str(out), "--max-steps", "2"], capsys)[0] == 0
    rc, err = run_cli(SMALL + ["--out", str(out), "--max-steps", "4"], capsys)
    assert rc == 0 and "resumed from" in err and "(step 2)" in err
    assert sorted(losses(out)) == [1, 2, 3, 4]
    rc, err = run_cli(SMALL + ["--out", str(out), "--max-steps", "6", "--optim.lr", "0.5"], capsys)
    assert rc == 2 and "holds a run with a different config (optim.lr: 0.003 there, 0.5 now)" in err
    rc, err = run_cli(SMALL + ["--out", str(out), "--max-steps", "6", "--resume", "no"], capsys)
    assert rc == 2 and "already holds checkpoints" in err
    assert sorted(losses(out)) == [1, 2, 3, 4]  # nothing was overwritten


@pytest.mark.slow
def test_two_processes_match_one(builtin_cache, tmp_path):
    args = SMALL + ["--max-steps", "5", "--model.dropout", "0", "--model.attention_dropout", "0"]
    env = subprocess_env(builtin_cache)
    one = subprocess.run([sys.executable, "-m", "d2v_fast.pretrain", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "d2v_fast.pretrain", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert two.stderr.count("d2v_fast: recipe") == 1  # only rank 0 talks


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(builtin_cache, tmp_path):
    env = subprocess_env(builtin_cache)
    base = [sys.executable, "-m", "d2v_fast.pretrain", *SMALL, "--max-steps", "30", "--train.ckpt_every", "1"]
    ref = subprocess.run(base + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(os.urandom(8))
    run = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints").is_dir():
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.8))  # anywhere in the following steps, checkpoint writes included
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(base + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert losses(run) == losses(tmp_path / "ref")
    assert not list((run / "checkpoints").glob(".*partial"))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, needle", [
    (["--optim.nope", "1"], "unrecognized arguments: --optim.nope"),
    (["--optim.lr", "-1"], "--optim.lr -1.0: must be > 0"),
    (["--optim.lr", "fast"], "--optim.lr 'fast': expected a number"),
    (["--seq-len", "600"], "--seq-len 600: longer than the position table"),
    (["--config", "huge"], "--config 'huge': unknown preset"),
    (["--recipe.top_k", "9"], "--recipe.top_k 9: must be in [1, 4]"),
    (["--train.dtype", "fp8"], "--train.dtype 'fp8'"),
    (["--resume", "maybe"], "argument --resume: invalid choice: 'maybe'"),
    (["--train.attention", "flash"], "--train.attention 'flash': text batches carry a padding mask"),
])
def test_bad_flags_stop_with_one_line_and_exit_2(argv, needle, capsys):
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_batch_not_divisible_by_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc, err = run_cli(["--batch-size", "16"], capsys)
    assert rc == 2 and "--batch-size 16: not divisible by the world size 3" in err


def test_data_that_is_not_a_prepared_corpus(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("hello")
    rc, err = run_cli(["--data", str(tmp_path)], capsys)
    assert rc == 2 and err.strip() == f"error: --data {tmp_path}: not a prepared corpus (no meta.json); " \
                                      "prepare one with `python -m d2v_fast.data.prepare --input ... --out DIR`"


def test_collapse_guard_stops_with_a_clear_error(builtin_cache, tmp_path, capsys):
    rc, err = run_cli(SMALL + ["--out", str(tmp_path / "r"), "--max-steps", "5", "--train.collapse_warmup", "2",
                               "--train.min_target_var", "50"], capsys)
    assert rc == 1
    assert "error: representation collapse at step 2: target_var" in err and "--train.min_target_var" in err


def test_varlen_attention_packing_matches_the_masked_path(monkeypatch):
    """The flash-attn varlen path (used on CUDA when flash-attn is installed) packs the real
    tokens; checked here with a stand-in kernel that attends within each sequence."""
    from d2v_fast.models import blocks as enc_mod

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0):
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        return out

    monkeypatch.setattr(enc_mod, "flash_attn_varlen_func", fake_varlen)
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, max_seq_len=16)
    layer = Encoder(cfg).eval().encoder.layer[0]
    h = torch.randn(3, 11, 32)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[0, 7:] = True
    pad[2, 2:] = True
    with torch.no_grad():
        a, fa = layer(h, enc_mod.Varlen(pad))
        b, fb = layer(h, enc_mod.attention_mask(pad))
    torch.testing.assert_close(a[~pad], b[~pad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fa[~pad], fb[~pad], rtol=1e-5, atol=1e-5)


def test_engine_with_triton_kernels_matches_reference(builtin_cache, tmp_path):
    """The fused kernels (Triton's interpreter on CPU) inside the real training step."""
    from d2v_fast import ops

    cfg = small_cfg(builtin_cache, max_steps=10, batch_size=4)
    cfg.data.seq_len, cfg.data.block_mode, cfg.train.kernels = 32, "document", "triton"
    corpus = open_corpus(builtin_cache)
    try:
        tr = Trainer(cfg, corpus, tmp_path)
        x = torch.zeros(1, 1, 4)
        assert ops.kernels_backend(x) == "triton"
        state = copy.deepcopy(tr.model.state_dict())
        engine = [r["loss"] for r in tr.fit()]
    finally:
        ops.set_kernels("auto")
    ref = reference_losses(cfg, corpus, 10, engine_state=state)
    for step, (a, b) in enumerate(zip(engine, ref), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: engine {a} reference {b}"
