"""What several test files share: a small training config, the per-step losses of a run,
and the environment for subprocess runs."""
import json
import os
from pathlib import Path

from d2v_fast.config import preset

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(corpus_path, recipe="data2vec", seq_len=64, batch_size=8, **train):
    """The tiny preset at a test-sized batch, no DataLoader workers, every step logged."""
    cfg = preset("tiny", recipe)
    cfg.data.path, cfg.data.seq_len, cfg.data.num_workers = str(corpus_path), seq_len, 0
    cfg.train.batch_size, cfg.train.log_every, cfg.train.progress, cfg.train.ckpt_every = batch_size, 1, False, 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def losses(run_dir):
    """{step: loss} from a run's metrics.jsonl (probe records, which have no loss, left out)."""
    records = map(json.loads, Path(run_dir, "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def subprocess_env(cache, **extra):
    """Environment for a pretraining subprocess: the test session's corpus cache, this checkout."""
    env = dict(os.environ, D2V_FAST_CACHE=str(Path(cache).parent), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env
