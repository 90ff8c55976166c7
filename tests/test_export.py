"""Hugging Face interop: export, warm start, round trip, bad input, fine-tuning example."""
import json
import random
import subprocess
import sys

import pytest
import torch

from d2v_fast import export as ex
from d2v_fast import load_pretrained, pretrain
from d2v_fast.checkpoint import load_checkpoint
from d2v_fast.data.text.tokenizer import load_tokenizer

from .helpers import ROOT

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra (pip install -e '.[dev]')")

ARGS = ["--train.probe_task", "none", "--config", "tiny", "--seq-len", "64", "--batch-size", "8", "--data.num_workers", "0",
        "--train.progress", "false", "--train.log_every", "1"]


@pytest.fixture(scope="module")
def run_dir(builtin_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert pretrain.main(ARGS + ["--out", str(out), "--max-steps", "3"]) == 0
    return out


def padded_batch(vocab=8192):
    x = torch.randint(5, vocab, (3, 21))
    x[:, 0] = 0
    x[1, 14:] = 1
    x[2, 6:] = 1
    return x, (x != 1).long()


def export_cli(argv, capsys):
    rc = ex.main(argv)
    return rc, capsys.readouterr().err


def test_export_loads_in_transformers_with_no_key_problems(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    rc, err = export_cli([str(run_dir), str(out)], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "data2vec-text" and cfg["architectures"] == ["Data2VecTextModel"]
    assert cfg["dtype"] == "float32" and isinstance(cfg["hidden_size"], int) and cfg["max_position_embeddings"] == 130
    model, info = transformers.Data2VecTextModel.from_pretrained(str(out), output_loading_info=True)
    assert (len(info["missing_keys"]), len(info["unexpected_keys"]), len(info["mismatched_keys"])) == (0, 0, 0), info
    ours = load_pretrained(run_dir)
    x, am = padded_batch()
    with torch.no_grad():
        a = model.eval()(input_ids=x, attention_mask=am).last_hidden_state
        b = ours(x, am)
    keep = am.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)


def test_exported_tokenizer_matches_ours(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_cli([str(run_dir), str(out)], capsys)[0] == 0
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(run_dir / "tokenizer")
    text = "Return the number of <mask> in the given sequence, or raise ValueError."
    assert hf(text)["input_ids"] == ours.encode(text).ids
    assert hf.mask_token_id in hf(text)["input_ids"] and hf.model_max_length == 128


def test_bf16_export_loads_as_bf16(run_dir, tmp_path, capsys):
    out = tmp_path / "hf16"
    assert export_cli([str(run_dir), str(out), "--dtype", "bfloat16"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.Data2VecTextModel.from_pretrained(str(out), dtype="auto")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_teacher_export_holds_the_teacher(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    assert export_cli([str(run_dir), str(tmp_path / "t"), "--weights", "teacher"], capsys)[0] == 0
    assert export_cli([str(run_dir), str(tmp_path / "s")], capsys)[0] == 0
    t, s = load_file(str(tmp_path / "t" / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    assert t.keys() == s.keys()
    state = load_checkpoint(sorted((run_dir / "checkpoints").iterdir())[-1])["model"]
    k = "encoder.layer.0.intermediate.dense.weight"
    assert torch.equal(t[k], state["teacher.0.intermediate.dense.weight"]) and not torch.equal(t[k], s[k])
    assert torch.equal(t["embeddings.word_embeddings.weight"], s["embeddings.word_embeddings.weight"])


def test_round_trip_export_init_from_export_is_identical(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    a = tmp_path / "a"
    assert export_cli([str(run_dir), str(a)], capsys)[0] == 0
    run2 = tmp_path / "run2"
    rc = pretrain.main(ARGS + ["--out", str(run2), "--max-steps", "0", "--init-from", str(a)])
    assert rc == 0, capsys.readouterr().err
    b = tmp_path / "b"
    assert export_cli([str(run2), str(b)], capsys)[0] == 0
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the teacher starts as the loaded weights too
    assert export_cli([str(run2), str(tmp_path / "bt"), "--weights", "teacher"], capsys)[0] == 0
    tt = load_file(str(tmp_path / "bt" / "model.safetensors"))
    assert all(torch.equal(ta[k], tt[k]) for k in ta)


def test_init_from_a_roberta_model_directory(run_dir, tmp_path, capsys):
    cfg = json.loads((run_dir / "config.json").read_text())["model"]
    rcfg = transformers.RobertaConfig(vocab_size=8192, hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_layers"],
                                      num_attention_heads=cfg["num_heads"], intermediate_size=cfg["ffn_size"],
                                      max_position_embeddings=130, type_vocab_size=1, pad_token_id=1)
    roberta = transformers.RobertaForMaskedLM(rcfg)
    roberta.save_pretrained(str(tmp_path / "roberta"))  # keys carry the "roberta." prefix
    run2 = tmp_path / "run2"
    assert pretrain.main(ARGS + ["--out", str(run2), "--max-steps", "0", "--init-from", str(tmp_path / "roberta")]) == 0
    enc = load_pretrained(run2)
    want = roberta.roberta.state_dict()
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)


def test_init_from_with_the_wrong_size_is_refused(run_dir, tmp_path, capsys):
    rcfg = transformers.RobertaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128, max_position_embeddings=130, type_vocab_size=1)
    transformers.RobertaModel(rcfg).save_pretrained(str(tmp_path / "small"))
    rc = pretrain.main(ARGS + ["--out", str(tmp_path / "r"), "--max-steps", "0", "--init-from", str(tmp_path / "small")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --init-from") and "hidden_size is 64" in err[-1], err


def test_export_without_a_checkpoint_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty_run").mkdir()
    r = subprocess.run([sys.executable, "-m", "d2v_fast.export", str(tmp_path / "empty_run"), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "holds no checkpoint" in r.stderr


def test_export_of_an_incomplete_checkpoint_is_one_line_exit_2(run_dir, tmp_path, capsys):
    broken = tmp_path / "run" / "checkpoints"
    broken.mkdir(parents=True)
    partial = broken / ".step-00000009.partial"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half a checkpoint")
    rc, err = export_cli([str(tmp_path / "run"), str(tmp_path / "o")], capsys)
    assert rc == 2 and "only an incomplete checkpoint" in err
    rc, err = export_cli([str(partial), str(tmp_path / "o")], capsys)
    assert rc == 2 and "incomplete checkpoint" in err
    assert len(err.strip().splitlines()) == 1


def test_finetune_example_end_to_end(run_dir, tmp_path, capsys):
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (a dev extra)")
    model = tmp_path / "hf"
    assert export_cli([str(run_dir), str(model)], capsys)[0] == 0
    rng = random.Random()
    words = "the file is open and the value returns a list of strings from the module".split()

    def row():
        label = rng.choice(["pos", "neg"])
        text = " ".join(rng.choice(words) for _ in range(8)) + (" good" if label == "pos" else " bad")
        return {"text": text, "label": label}

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(48)))
    with open(tmp_path / "dev.csv", "w") as f:
        f.write("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in (row() for _ in range(16))))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_classification.py"), "--model", str(model),
                        "--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "dev.csv"),
                        "--out", str(tmp_path / "cls"), "--epochs", "1", "--batch-size", "8", "--no-scratch"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = json.loads((tmp_path / "cls" / "eval_results.json").read_text())["eval_accuracy"]
    assert 0.0 <= acc <= 1.0 and "accuracy" in r.stdout


def test_weight_files_have_the_mode_of_every_other_file(run_dir, tmp_path, capsys):
    """safetensors writes 0600; run directories and exports are meant to be shared, so the
    weights get what every other file gets under the umask."""
    import os

    from d2v_fast.files import file_mode

    def modes(root):
        return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in root.rglob("*") if p.is_file()}

    found = modes(run_dir)
    assert {"encoder.safetensors", "checkpoints/step-00000003/model.safetensors", "metrics.jsonl"} <= set(found)
    assert set(found.values()) == {oct(file_mode())}, found
    old = os.umask(0o002)  # a group-shared directory
    try:
        rc, err = export_cli([str(run_dir), str(tmp_path / "hf")], capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    exported = modes(tmp_path / "hf")
    assert exported["model.safetensors"] == exported["config.json"] == oct(0o664), exported
