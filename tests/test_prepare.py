"""Corpus preparation: inputs, tokenizer, shards, meta.json, atomicity and bad input."""
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from d2v_fast.data import prepare as prep
from d2v_fast.data.text.corpus import ShardWriter, open_corpus, token_dtype
from d2v_fast.data.text.tokenizer import load_tokenizer, tokenizer_checksum
from d2v_fast.errors import UsageError

WORDS = ("the model learns to predict representations of the masked input from a teacher "
         "that sees everything while a student sees only part of it and we measure speed").split()


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 30))) + "."


def make_docs(rng, n):
    return [" ".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def prepare(argv, capsys):
    rc = prep.main(argv + ["--quiet"])
    return rc, capsys.readouterr().err


def decode_docs(corpus):
    tok = corpus.tokenizer()
    docs = []
    for tokens, offsets in zip(corpus.tokens, corpus.doc_offsets):
        for a, b in zip(offsets[:-1], offsets[1:]):
            ids = tokens[a:b].tolist()
            assert ids[-1] == corpus.special_ids["eos"], "every document ends with </s>"
            docs.append(tok.decode(ids[:-1]))
    return docs


@pytest.fixture
def rng():
    return random.Random(os.urandom(8))


def test_txt_jsonl_gz_dirs_and_globs_round_trip(tmp_path, rng, capsys):
    docs = make_docs(rng, 40)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("\n\n".join(docs[:10]) + "\n")
    with gzip.open(src / "sub" / "b.txt.gz", "wt") as f:
        f.write("\n\n\n".join(docs[10:20]))
    (src / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[20:30])))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": d}) + "\n\n" for d in docs[30:]))
    (src / "ignored.csv").write_text("not, an, input\n")
    out = tmp_path / "corpus"
    rc, err = prepare(["--input", str(src), str(tmp_path / "*.jsonl.gz"), "--out", str(out),
                       "--vocab-size", "400", "--text-field", "body", "--workers", "2"], capsys)
    assert rc == 0, err
    corpus = open_corpus(out)
    # files are taken sorted within a directory: a.txt, c.jsonl, sub/b.txt.gz, then the glob
    expected = docs[:10] + docs[20:30] + docs[10:20] + docs[30:]
    assert decode_docs(corpus) == expected
    meta = corpus.meta
    assert meta["num_documents"] == 40
    assert meta["num_tokens"] == sum(len(t) for t in corpus.tokens)
    assert meta["dtype"] == "uint16" and corpus.tokens[0].dtype == np.uint16
    assert meta["special_ids"] == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
    assert meta["tokenizer"]["sha256"] == tokenizer_checksum(out / "tokenizer")
    assert int(max(t.max() for t in corpus.tokens)) < meta["vocab_size"]
    assert not list(tmp_path.glob(".corpus.partial-*"))


def test_txt_file_mode_and_multiline_blocks(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("line one\nline two\n\nstill the same file\n")
    (tmp_path / "two.txt").write_text("second file\n")
    out = tmp_path / "c"
    rc, err = prepare(["--input", str(tmp_path / "*.txt"), "--out", str(out), "--vocab-size", "300",
                       "--txt-docs", "file", "--workers", "1"], capsys)
    assert rc == 0, err
    assert decode_docs(open_corpus(out)) == ["line one\nline two\n\nstill the same file", "second file"]
    out2 = tmp_path / "c2"
    rc, err = prepare(["--input", str(tmp_path / "one.txt"), "--out", str(out2), "--vocab-size", "300"], capsys)
    assert rc == 0, err
    assert decode_docs(open_corpus(out2)) == ["line one\nline two", "still the same file"]


def test_workers_do_not_change_output_and_shards_roll_over(tmp_path, rng, capsys):
    (tmp_path / "in.txt").write_text("\n\n".join(make_docs(rng, 300)))
    (tmp_path / "tok").mkdir()
    outs = []
    for workers, shard in ((1, 1 << 20), (2, 1 << 20), (2, 500)):
        out = tmp_path / f"c{workers}-{shard}"
        args = ["--input", str(tmp_path / "in.txt"), "--out", str(out), "--workers", str(workers),
                "--shard-tokens", str(shard)]
        args += ["--vocab-size", "500"] if not outs else ["--tokenizer", str(outs[0] / "tokenizer")]
        rc, err = prepare(args, capsys)
        assert rc == 0, err
        outs.append(out)
    a, b, c = (open_corpus(o) for o in outs)
    assert np.array_equal(a.tokens[0], b.tokens[0])
    assert len(c.meta["shards"]) > 1
    assert np.array_equal(np.concatenate(c.tokens), a.tokens[0])
    for shard, tokens in zip(c.meta["shards"], c.tokens):
        assert shard["num_tokens"] == len(tokens)
        assert tokens[-1] == 2  # no document is split across shards
    assert sum(s["num_documents"] for s in c.meta["shards"]) == 300


def test_rerun_is_a_no_op_and_a_different_corpus_is_refused(tmp_path, rng, capsys):
    (tmp_path / "in.txt").write_text("\n\n".join(make_docs(rng, 20)))
    out = tmp_path / "c"
    base = ["--input", str(tmp_path / "in.txt"), "--out", str(out), "--vocab-size", "300"]
    assert prepare(base, capsys)[0] == 0
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare(base, capsys)[0] == 0
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    rc, err = prepare(base[:-1] + ["320"], capsys)
    assert rc == 2 and "holds a different corpus" in err and str(out) in err
    assert prepare(base[:-1] + ["320", "--force"], capsys)[0] == 0
    assert (out / "meta.json").stat().st_mtime_ns != stamp


def test_tokenizer_directories(tmp_path, rng, capsys):
    (tmp_path / "in.txt").write_text("\n\n".join(make_docs(rng, 30)))
    out = tmp_path / "c"
    assert prepare(["--input", str(tmp_path / "in.txt"), "--out", str(out), "--vocab-size", "350"], capsys)[0] == 0
    tok = load_tokenizer(out / "tokenizer")
    # vocab.json + merges.txt alone give the same tokenizer
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (legacy / name).write_bytes((out / "tokenizer" / name).read_bytes())
    text = sentence(rng, 12) + " <mask> " + sentence(rng, 5)
    assert load_tokenizer(legacy).encode(text).ids == tok.encode(text).ids
    out2 = tmp_path / "c2"
    assert prepare(["--input", str(tmp_path / "in.txt"), "--out", str(out2), "--tokenizer", str(legacy)], capsys)[0] == 0
    assert np.array_equal(open_corpus(out2).tokens[0], open_corpus(out).tokens[0])


def test_saved_tokenizer_loads_in_transformers(tmp_path, rng, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")
    (tmp_path / "in.txt").write_text("\n\n".join(make_docs(rng, 30)))
    out = tmp_path / "c"
    assert prepare(["--input", str(tmp_path / "in.txt"), "--out", str(out), "--vocab-size", "350"], capsys)[0] == 0
    hf = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    ours = load_tokenizer(out / "tokenizer")
    text = sentence(rng, 8) + " <mask> " + sentence(rng, 4)
    assert hf(text)["input_ids"] == ours.encode(text).ids
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.mask_token_id == 4 and 4 in hf(text)["input_ids"]


def test_uint32_shards_when_the_vocabulary_is_large(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    w = ShardWriter(tmp_path, np.uint32, eos_id=2, shard_tokens=10)
    ids = np.array([70000, 5, 2, 100000, 2], dtype=np.int64)
    w.add(ids, np.array([3, 2]))
    shards = w.finish()
    assert [s["num_tokens"] for s in shards] == [5]
    assert np.fromfile(tmp_path / "tokens-00000.bin", dtype=np.uint32).tolist() == ids.tolist()


# ------------------------------------------------------------------------ bad input: exit 2
def one_line_error(rc, err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_path(tmp_path, capsys):
    msg = one_line_error(*prepare(["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")], capsys))
    assert "nope.txt" in msg and "no such file" in msg


def test_glob_matching_nothing(tmp_path, capsys):
    msg = one_line_error(*prepare(["--input", str(tmp_path / "*.txt"), "--out", str(tmp_path / "o")], capsys))
    assert "matches nothing" in msg


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    msg = one_line_error(*prepare(["--input", str(tmp_path / "blank.txt"), str(tmp_path / "e.jsonl"),
                                   "--out", str(tmp_path / "o"), "--vocab-size", "300"], capsys))
    assert "no documents" in msg and "blank.txt" in msg
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def test_non_utf8_only_input_is_rejected(tmp_path, capsys):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    msg = one_line_error(*prepare(["--input", str(tmp_path / "latin.txt"), "--out", str(tmp_path / "o")], capsys))
    assert "latin.txt" in msg and "UTF-8" in msg and "0xe9" in msg


def test_non_utf8_file_among_others_is_skipped_with_a_warning(tmp_path, rng, capsys):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    docs = make_docs(rng, 5)
    (tmp_path / "good.txt").write_text("\n\n".join(docs))
    with pytest.warns(UserWarning, match="skipping .*latin.txt: not UTF-8"):
        rc, err = prepare(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--vocab-size", "300"], capsys)
    assert rc == 0, err
    assert decode_docs(open_corpus(tmp_path / "o")) == docs


def test_jsonl_line_without_the_text_field(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    msg = one_line_error(*prepare(["--input", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")], capsys))
    assert "d.jsonl:2" in msg and "'text'" in msg and "--text-field" in msg


def test_jsonl_line_that_is_not_json(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    msg = one_line_error(*prepare(["--input", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")], capsys))
    assert "d.jsonl:2" in msg and "not valid JSON" in msg


def test_tokenizer_directory_without_files(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("some text\n")
    (tmp_path / "tok").mkdir()
    msg = one_line_error(*prepare(["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "o"),
                                   "--tokenizer", str(tmp_path / "tok")], capsys))
    assert str(tmp_path / "tok") in msg and "tokenizer.json" in msg


def test_tokenizer_with_wrong_special_ids(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("some text\n")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<s>": 2}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    msg = one_line_error(*prepare(["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "o"),
                                   "--tokenizer", str(tok)], capsys))
    assert "'<s>' has id" in msg


def test_output_directory_that_is_not_a_corpus(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("some text\n")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("keep me")
    msg = one_line_error(*prepare(["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "o")], capsys))
    assert "not empty" in msg
    assert (tmp_path / "o" / "precious.txt").read_text() == "keep me"


def test_broken_gzip(tmp_path, capsys):
    (tmp_path / "x.txt.gz").write_bytes(b"this is not gzip")
    msg = one_line_error(*prepare(["--input", str(tmp_path / "x.txt.gz"), "--out", str(tmp_path / "o")], capsys))
    assert "x.txt.gz" in msg and "gzip" in msg


def test_cli_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "d2v_fast.data.prepare", "--input", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr


# ------------------------------------------------------------------------ atomic output
def test_interrupted_run_leaves_nothing_that_looks_valid(tmp_path, rng, monkeypatch, capsys):
    (tmp_path / "in.txt").write_text("\n\n".join(make_docs(rng, 50)))

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "add", boom)
    rc = prep.main(["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "o"), "--vocab-size", "300",
                    "--quiet", "--workers", "1"])
    assert rc == 130
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))


def test_sigkill_mid_write_then_rerun(tmp_path, rng):
    docs = make_docs(rng, 4000)
    (tmp_path / "in.txt").write_text("\n\n".join(docs))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "d2v_fast.data.prepare", "--input", str(tmp_path / "in.txt"), "--out", str(out),
           "--vocab-size", "400", "--workers", "1", "--quiet", "--shard-tokens", "1000"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".o.partial-*/tokens-00002.bin")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".o.partial-*")), "the kill should land while shards are being written"
    assert not (out / "meta.json").exists()
    with pytest.raises(UsageError, match="not a prepared corpus|no such directory"):
        open_corpus(out)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert open_corpus(out).num_documents == len(docs)
    assert not list(tmp_path.glob(".o.partial-*")), "the stale staging directory is cleaned up"


def test_truncated_shard_is_reported(tmp_path, rng, capsys):
    (tmp_path / "in.txt").write_text("\n\n".join(make_docs(rng, 20)))
    out = tmp_path / "o"
    assert prepare(["--input", str(tmp_path / "in.txt"), "--out", str(out), "--vocab-size", "300"], capsys)[0] == 0
    shard = out / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(UsageError, match=r"tokens-00000\.bin: \d+ bytes, expected \d+"):
        open_corpus(out)
