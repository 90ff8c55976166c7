"""Blocks, the distributed resumable sampler, the masking collator, the DataLoader and
the built-in corpus."""
import random

import numpy as np
import pytest
import torch

from d2v_fast.data.text import prepare as prep
from d2v_fast.data.text.builtin import builtin_corpus, builtin_corpus_path
from d2v_fast.data.text.corpus import open_corpus
from d2v_fast.data.text.dataset import BlockDataset, MaskCollator, MaskingConfig, block_table, build_dataloader
from d2v_fast.data.loader import BlockSampler
from d2v_fast.errors import UsageError

BOS, PAD, EOS, MASK = 0, 1, 2, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of very different lengths (1 to ~400 tokens), two shards."""
    tmp = tmp_path_factory.mktemp("ds")
    rng = random.Random(1234)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 5, 40, 120, 300])))
            for _ in range(120)]
    (tmp / "in.txt").write_text("\n\n".join(docs))
    prep.prepare_corpus(tmp / "c", inputs=[str(tmp / "in.txt")], vocab_size=300, workers=1,
                        shard_tokens=4000, progress=False)
    c = open_corpus(tmp / "c")
    assert len(c.tokens) >= 2
    return c


@pytest.mark.parametrize("seq_len", [3, 17, 64, 130])
def test_pack_blocks_cover_every_token_once(corpus, seq_len):
    table = block_table(corpus, seq_len, "pack")
    assert (table[:, 2] <= seq_len - 2).all() and (table[:, 2] >= 1).all()
    for shard, tokens in enumerate(corpus.tokens):
        rows = table[table[:, 0] == shard]
        got = np.concatenate([tokens[s:s + n] for _, s, n in rows])
        assert np.array_equal(got, tokens)


@pytest.mark.parametrize("seq_len", [3, 17, 64, 130])
def test_document_blocks_never_cross_a_document_end(corpus, seq_len):
    table = block_table(corpus, seq_len, "document")
    for shard, (tokens, offsets) in enumerate(zip(corpus.tokens, corpus.doc_offsets)):
        rows = table[table[:, 0] == shard]
        doc_of = np.searchsorted(offsets, rows[:, 1], side="right") - 1
        ends = offsets[doc_of + 1] - 1  # position of the document's </s>
        assert (rows[:, 1] + rows[:, 2] <= ends).all()
        got = np.concatenate([tokens[s:s + n] for _, s, n in rows])
        assert np.array_equal(got, tokens[tokens != EOS])  # all content, no separators


def test_items_are_framed_and_padded(corpus):
    ds = BlockDataset(corpus, 64, "document")
    lengths = ds.table[:, 2]
    short = int(np.argmin(lengths))
    item = ds[(3, short)]
    ids, n = item["input_ids"], int(lengths[short])
    assert item["epoch"] == 3 and item["index"] == short and ids.dtype == torch.long and ids.shape == (64,)
    assert ids[0] == BOS and ids[n + 1] == EOS and (ids[n + 2:] == PAD).all()
    assert not torch.isin(ids[1:n + 1], torch.tensor([BOS, PAD, EOS])).any()


def test_sampler_shards_ranks_and_is_deterministic():
    n, g = 103, 12
    full = [i for _, i in BlockSampler(n, global_batch_size=g, seed=5, epoch=2)]
    assert len(full) == (n // g) * g and len(set(full)) == len(full)
    again = [i for _, i in BlockSampler(n, global_batch_size=g, seed=5, epoch=2)]
    assert full == again
    assert full != [i for _, i in BlockSampler(n, global_batch_size=g, seed=5, epoch=3)]
    assert full != [i for _, i in BlockSampler(n, global_batch_size=g, seed=6, epoch=2)]
    for world in (2, 3, 4):
        per_rank = [list(BlockSampler(n, global_batch_size=g, rank=r, world_size=world, seed=5, epoch=2))
                    for r in range(world)]
        assert all(e == 2 for r in per_rank for e, _ in r)
        local = g // world
        # step s of the single-process order is the concatenation of every rank's step-s slice
        for s in range(n // g):
            step = sum(([i for _, i in r[s * local:(s + 1) * local]] for r in per_rank), [])
            assert step == full[s * g:(s + 1) * g]


def test_sampler_resumes_at_any_world_size():
    n, g = 100, 8
    full = [i for _, i in BlockSampler(n, global_batch_size=g, seed=1)]
    k = 5
    for world in (1, 2, 4):
        rest = [[i for _, i in BlockSampler(n, global_batch_size=g, rank=r, world_size=world, seed=1, start=k * g)]
                for r in range(world)]
        local = g // world
        merged = [i for s in range(n // g - k) for r in rest for i in r[s * local:(s + 1) * local]]
        assert merged == full[k * g:]


def test_sampler_rejects_bad_sizes():
    with pytest.raises(UsageError, match="not divisible by the world size"):
        BlockSampler(100, global_batch_size=10, world_size=3)
    with pytest.raises(UsageError, match="fewer than one batch"):
        BlockSampler(5, global_batch_size=8)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        BlockSampler(100, global_batch_size=8, start=3)


def test_collator_masks_only_real_tokens(corpus):
    ds = BlockDataset(corpus, 64, "document")
    idx = torch.randperm(len(ds))[:32].tolist()
    items = [ds[(1, i)] for i in idx]
    batch = MaskCollator(corpus.special_ids, MaskingConfig("span", 0.35, 4), seed=7)(items)
    ids, mask = batch["input_ids"], batch["mask"]
    assert mask.shape == ids.shape and mask.dtype == torch.bool
    assert not mask[torch.isin(ids, torch.tensor([BOS, PAD, EOS]))].any()
    assert torch.equal(batch["padding_mask"], ids == PAD)
    assert (batch["masked_input_ids"][mask] == MASK).all()
    assert torch.equal(batch["masked_input_ids"][~mask], ids[~mask])
    assert batch["indices"].tolist() == idx and batch["epoch"] == 1
    real = (~torch.isin(ids, torch.tensor([BOS, PAD, EOS]))).sum()
    assert 0.2 < mask.sum() / real < 0.4
    # the same sample gets the same mask in another batch
    again = MaskCollator(corpus.special_ids, MaskingConfig("span", 0.35, 4), seed=7)(items[::-1])
    assert torch.equal(again["mask"], mask.flip(0))


def test_collator_random_clones(corpus):
    ds = BlockDataset(corpus, 64, "pack")
    items = [ds[(0, i)] for i in range(4)]
    batch = MaskCollator(corpus.special_ids, MaskingConfig("random", 0.48, 1, clones=3), seed=0)(items)
    mask = batch["mask"]
    assert mask.shape == (12, 64) and "masked_input_ids" not in batch
    maskable = batch["input_ids"] != PAD  # data2vec 2.0 masks every non-padding position
    for row in range(12):
        m = maskable[row // 3]
        assert not mask[row][~m].any()
        assert mask[row].sum() == int(m.sum().item() * 0.48)


def test_dataloader_workers_match_in_process(corpus):
    kw = dict(seq_len=48, micro_batch_size=4, global_batch_size=8, seed=3, epoch=1,
              masking=MaskingConfig("span", 0.35, 4))
    a = list(build_dataloader(corpus, num_workers=0, **kw))
    b = list(build_dataloader(corpus, num_workers=2, **kw))
    assert len(a) == len(b) == 2 * (len(BlockDataset(corpus, 48)) // 8)
    for x, y in zip(a, b):
        for key in ("input_ids", "mask", "masked_input_ids", "indices"):
            assert torch.equal(x[key], y[key])
    # two ranks with micro batches of 2 see exactly the micro batches of one rank, regrouped
    ranks = [list(build_dataloader(corpus, num_workers=0, rank=r, world_size=2,
                                   **{**kw, "micro_batch_size": 2})) for r in range(2)]
    step0 = torch.cat([ranks[0][0]["mask"], ranks[0][1]["mask"], ranks[1][0]["mask"], ranks[1][1]["mask"]])
    assert torch.equal(step0, torch.cat([a[0]["mask"], a[1]["mask"]]))


def test_dataloader_rejects_a_micro_batch_that_does_not_divide(corpus):
    with pytest.raises(UsageError, match="must divide the per-rank batch"):
        build_dataloader(corpus, seq_len=32, micro_batch_size=3, global_batch_size=8)


def test_builtin_corpus_is_built_once_and_is_english(builtin_cache):
    path = builtin_cache
    assert path == builtin_corpus_path()
    c = open_corpus(path)
    assert c.num_documents > 1000 and c.num_tokens > 100_000 and c.vocab_size == 8192
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert builtin_corpus(progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp
    text = c.tokenizer().decode(c.tokens[0][:2000].tolist())
    common = sum(text.count(f" {w} ") for w in ("the", "of", "a", "is", "to"))
    assert common > 50, text[:300]
