"""The trainer's metrics: one JSON record per logged step in ``RUN_DIR/metrics.jsonl`` (and
TensorBoard events under ``RUN_DIR/tensorboard`` when it is installed), and after a resume the
records of steps that will be run again dropped; see docs/reliability.md."""
from __future__ import annotations

import json


class Metrics:
    """The trainer's metrics records (mixed into ``Trainer``)."""

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = False
        if self._tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def truncate_metrics(self) -> None:
        """After a resume, drop records of steps that will be run again."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank == 0 and path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash
            path.write_text("".join(l + "\n" for l in keep))
