"""Loading a checkpoint or an encoder runs no code from the file: crafted pickles are refused
by every loader, damaged or edited safetensors are refused with one line, and run
directories of the older pickle format convert once and resume exactly."""
import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from d2v_fast import checkpoint as ckpt
from d2v_fast import export as ex
from d2v_fast import load_pretrained, pretrain
from d2v_fast.errors import UsageError

from .helpers import losses

ARGS = ["--train.probe_task", "none", "--config", "tiny", "--seq-len", "64", "--batch-size", "8", "--data.num_workers", "0",
        "--train.progress", "false", "--train.log_every", "1", "--optim.total_steps", "4"]


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(path, marker, *, zip_format=True):
    """A file a d2v_fast loader might be pointed at, that runs code when unpickled in full."""
    obj = {"format": "d2v_fast.encoder", "format_version": 2, "model": {}, "state_dict": Payload(marker)}
    if zip_format:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))


@pytest.fixture(scope="module")
def trained(builtin_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert pretrain.main(ARGS + ["--out", str(out), "--max-steps", "2"]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def last_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def resume(run_dir, capsys, steps=3):
    rc = pretrain.main(ARGS + ["--out", str(run_dir), "--max-steps", str(steps)])
    return rc, capsys.readouterr().err


def test_the_payload_is_live(tmp_path):
    """Without weights_only the crafted files do run code: the tests below can fail."""
    marker = tmp_path / "ran"
    crafted_pickle(tmp_path / "a.pt", marker)
    torch.load(tmp_path / "a.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    crafted_pickle(tmp_path / "b.pt", marker, zip_format=False)
    pickle.loads((tmp_path / "b.pt").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_crafted_state_pt_in_a_run_is_refused_everywhere(builtin_cache, tmp_path, capsys, zip_format):
    """A shared run directory whose only checkpoint is a crafted state.pt (the older layout)."""
    marker = tmp_path / "ran"
    run = tmp_path / "shared-run"
    step = run / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    crafted_pickle(step / "state.pt", marker, zip_format=zip_format)

    rc, err = resume(run, capsys)
    assert rc == 2 and "older pickle format" in last_line(err) and "d2v_fast.checkpoint convert" in err
    with pytest.raises(UsageError) as e:
        load_pretrained(run)
    assert "older pickle format" in str(e.value) and "\n" not in str(e.value)
    assert ex.main([str(run), str(tmp_path / "hf")]) == 2
    assert "older pickle format" in last_line(capsys.readouterr().err)
    assert ex.main([str(step / "state.pt"), str(tmp_path / "hf")]) == 2
    last_line(capsys.readouterr().err)
    assert pretrain.main(ARGS + ["--out", str(tmp_path / "r2"), "--max-steps", "0", "--init-from", str(run)]) == 2
    assert "export it first" in last_line(capsys.readouterr().err)
    # the conversion reads it as tensors and plain values only: refused too
    assert ckpt.main(["convert", str(run)]) == 2
    assert "refused" in last_line(capsys.readouterr().err)
    assert not marker.exists()


def test_crafted_files_inside_a_current_checkpoint_are_refused(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    step = ckpt.latest_checkpoint(run)
    good = (step / "state.pt").read_bytes()
    crafted_pickle(step / "state.pt", marker)
    rc, err = resume(run, capsys)
    line = last_line(err)
    assert rc == 2 and str(step / "state.pt") in line and "refused" in line and "nothing in it was run" in line
    # export reads only model.safetensors and config.json: it works, and runs nothing either
    assert ex.main([str(run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    (step / "state.pt").write_bytes(good)
    crafted_pickle(step / "rng-rank0.pt", marker, zip_format=False)
    rc, err = resume(run, capsys)
    assert rc == 2 and str(step / "rng-rank0.pt") in last_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_crafted_encoder_pt_is_refused_everywhere(run, tmp_path, capsys, zip_format):
    marker = tmp_path / "ran"
    for f in ("encoder.safetensors", "encoder.json"):
        (run / f).unlink()
    crafted_pickle(run / "encoder.pt", marker, zip_format=zip_format)
    for target in (run, run / "encoder.pt"):
        with pytest.raises(UsageError) as e:
            load_pretrained(target)
        assert "pickle" in str(e.value) and "d2v_fast.checkpoint convert" in str(e.value) and "\n" not in str(e.value)
    assert ex.main([str(run / "encoder.pt"), str(tmp_path / "hf")]) == 2
    last_line(capsys.readouterr().err)
    assert pretrain.main(ARGS + ["--out", str(tmp_path / "r2"), "--max-steps", "0",
                                 "--init-from", str(run / "encoder.pt")]) == 2
    assert "not a directory" in last_line(capsys.readouterr().err)
    assert ckpt.main(["convert", str(run / "encoder.pt")]) == 2
    assert "refused" in last_line(capsys.readouterr().err)
    assert not marker.exists() and (run / "encoder.pt").exists()


def test_crafted_pytorch_model_bin_for_init_from_is_refused(builtin_cache, tmp_path, capsys):
    marker = tmp_path / "ran"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    crafted_pickle(hf / "pytorch_model.bin", marker)
    assert pretrain.main(ARGS + ["--out", str(tmp_path / "r"), "--max-steps", "0", "--init-from", str(hf)]) == 2
    line = last_line(capsys.readouterr().err)
    assert str(hf / "pytorch_model.bin") in line and "refused" in line
    assert not marker.exists()


# ------------------------------------------------------------------ damaged or edited safetensors
def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_header(path, rehash_in=None, key="sha256"):
    """Changes the first tensor's shape in the header (data size kept: the offsets no longer fit)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # same header length
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + n:]))
    if rehash_in is not None:  # a careful editor who also fixes the recorded checksum
        meta = json.loads(rehash_in.read_text())
        meta[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        rehash_in.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["truncated", "edited", "edited+rehashed"])
def test_damaged_checkpoint_weights_are_refused_with_one_line(run, tmp_path, capsys, damage):
    step = ckpt.latest_checkpoint(run)
    f = step / "model.safetensors"
    if damage == "truncated":
        truncate(f)
    else:
        edit_header(f, rehash_in=step / "config.json" if damage == "edited+rehashed" else None, key="model_sha256")
    rc, err = resume(run, capsys)
    line = last_line(err)
    assert rc == 2 and str(f) in line
    assert ("sha256 differs" in line) == (damage != "edited+rehashed")
    assert ex.main([str(run), str(tmp_path / "hf")]) == 2 and str(f) in last_line(capsys.readouterr().err)
    with pytest.raises(UsageError) as e:
        load_pretrained(step)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "edited", "edited+rehashed"])
def test_damaged_encoder_file_is_refused_with_one_line(run, damage):
    f = run / "encoder.safetensors"
    if damage == "truncated":
        truncate(f)
    else:
        edit_header(f, rehash_in=run / "encoder.json" if damage == "edited+rehashed" else None)
    with pytest.raises(UsageError) as e:
        load_pretrained(run)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_from_another_model_or_format_is_refused(run, capsys):
    step = ckpt.latest_checkpoint(run)
    meta = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({**meta, "format_version": 3}))
    rc, err = resume(run, capsys)
    assert rc == 2 and "newer d2v_fast" in last_line(err)
    # a wider model in the same format: the tensors' shapes answer, naming one of them
    from safetensors.torch import load_file, save_file

    weights = load_file(str(step / "model.safetensors"))
    weights["teacher.0.output.dense.bias"] = torch.zeros(7)
    save_file(weights, str(step / "model.safetensors"))
    meta["model_sha256"] = ckpt.sha256_file(step / "model.safetensors")
    (step / "config.json").write_text(json.dumps(meta))
    rc, err = resume(run, capsys)
    line = last_line(err)
    assert rc == 2 and "teacher.0.output.dense.bias has shape [7]" in line


# ------------------------------------------------------------------ older run directories
def test_older_run_directory_is_refused_then_converts_and_resumes_exactly(builtin_cache, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert pretrain.main(ARGS + ["--out", str(full), "--max-steps", "4"]) == 0
    assert pretrain.main(ARGS + ["--out", str(part), "--max-steps", "2"]) == 0
    capsys.readouterr()
    step = ckpt.latest_checkpoint(part)
    # the older format: state.pt, rng-rank0.pt and encoder.pt were whole pickles
    state = ckpt.load_checkpoint(step)
    rng = ckpt.load_rng(step, 0)
    words = rng["numpy"]["key"].numpy().astype(np.uint32)
    old_rng = {"torch": rng["torch"], "python": (rng["python"][0], tuple(rng["python"][1]), rng["python"][2]),
               "numpy": ("MT19937", words, rng["numpy"]["pos"], rng["numpy"]["has_gauss"], rng["numpy"]["gauss"])}
    old_state = {k: state[k] for k in ("model", "optimizer", "scheduler", "step", "epoch", "position", "attempts",
                                       "skipped", "world_size", "parallel", "config", "corpus", "encoder_config")}
    old_meta = {k: state[k] for k in ("step", "config", "corpus", "world_size")}
    encoder = load_pretrained(part).state_dict()
    for f in list(step.iterdir()) + [part / "encoder.safetensors", part / "encoder.json"]:
        f.unlink()
    torch.save(old_state, step / "state.pt")
    torch.save(old_rng, step / "rng-rank0.pt")
    (step / "config.json").write_text(json.dumps(old_meta))
    torch.save({"format": "d2v_fast.encoder", "encoder_config": state["encoder_config"], "state_dict": encoder,
                "step": 2}, part / "encoder.pt")

    rc, err = resume(part, capsys, steps=4)
    assert rc == 2 and "python -m d2v_fast.checkpoint convert" in last_line(err)
    with pytest.raises(UsageError):
        load_pretrained(part)
    assert ckpt.main(["convert", str(part)]) == 0
    err = capsys.readouterr().err
    assert "converted" in err and "nothing in them was run" in err
    assert not (part / "encoder.pt").exists() and sorted(p.name for p in step.iterdir()) == \
        ["config.json", "model.safetensors", "rng-rank0.pt", "state.pt"]
    converted = load_pretrained(part).state_dict()
    assert all(torch.equal(converted[k], encoder[k]) for k in encoder)
    assert ckpt.main(["convert", str(part)]) == 0  # a second time: nothing left to do
    assert "0 file set(s) converted" in capsys.readouterr().err
    rc, err = resume(part, capsys, steps=4)
    assert rc == 0 and "resumed from" in err, err
    assert losses(part) == losses(full)  # the converted checkpoint resumes bit for bit
