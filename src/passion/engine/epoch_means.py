"""Epoch means of the per-iteration training statistics (the `mean_*` fields of epoch records).

Every iteration is counted, whether or not `train.log_every` writes its record to metrics.jsonl,
and the running sums travel in the checkpoint, so a run resumed in the middle of an epoch reports
the same means as an uninterrupted one.
"""
from __future__ import annotations

# Bookkeeping fields of an iteration record that make no sense averaged over an epoch.
NOT_AVERAGED = {"type", "epoch", "iteration", "step", "lr", "seconds", "samples_per_s", "beta",
                "relative_preference", "gate", "weight"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class EpochMeans:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict = {}  # key -> float, or {modality: float} for per-modality objects
        self.counts: dict[str, int] = {}

    def add(self, record: dict) -> None:
        for key, value in record.items():
            if key in NOT_AVERAGED:
                continue
            if _number(value):
                self.sums[key] = self.sums.get(key, 0) + value
            elif isinstance(value, dict) and value and all(_number(v) for v in value.values()):
                prev = self.sums.get(key, {})
                self.sums[key] = {m: prev.get(m, 0) + v for m, v in value.items()}
            else:
                continue
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict:
        out = {}
        for key, total in self.sums.items():
            n = self.counts[key]
            out[f"mean_{key}"] = {m: v / n for m, v in total.items()} if isinstance(total, dict) else total / n
        return out

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
