"""Scale-out of ``robustdeq evaluate``: cut the test subset into shards of whole blocks, run
each shard in its own process (``--shard i/k``, on as many machines as you like), and merge
the shard folders into one evaluation that equals a single-process run image for image
(``robustdeq merge-shards``).

Why the merge is exact: every batch of the evaluator stays inside one block of
``EvalConfig.block`` images and is seeded by its position in the whole subset, and every
choice the attacks make is taken on the validation split, never on the subset. A shard
therefore computes, for its images, exactly what one process computes for them. The merge
concatenates the per-sample records and recomputes every count and interval; means are
weighted by shard size, and timing medians (``cost_vs_plain``) become the median over shards.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple

import torch

from ..stats import Proportion

__all__ = ["Shard", "merge_shards", "ShardMergeError"]


class ShardMergeError(ValueError):
    """The folders given to the merge are not the complete, matching shards of one evaluation."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based, like a torchrun rank) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"--shard takes i/k with 0 <= i < k (for example 0/4), got {text!r}")
        shard = cls(int(m.group(1)), int(m.group(2)))
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"--shard {text}: the index must be in 0..{shard.count - 1}")
        return shard

    def bounds(self, n: int, block: int) -> Tuple[int, int]:
        """[start, stop) of this shard's images: whole blocks, as even as the blocks allow."""
        blocks = math.ceil(n / block)
        if self.count > blocks:
            raise ValueError(
                f"{n} images make {blocks} block(s) of {block}; they cannot be cut into {self.count} shards "
                f"(use at most {blocks} shards, or a smaller --block)"
            )
        first, last = self.index * blocks // self.count, (self.index + 1) * blocks // self.count
        return first * block, min(last * block, n)

    def check_families(self, config: Any, allowed: Sequence[str]) -> None:
        refused = [f for f in config.families if f not in allowed]
        if refused:
            raise ValueError(
                f"a shard runs only the per-sample families ({', '.join(allowed)}); {', '.join(refused)} "
                "summarise the whole subset: run them in one process, for example on the merged folder"
            )
        if config.defended_square_n is not None:
            raise ValueError("a shard attacks every survivor with Square: leave --defended-square-n unset")

    def to_dict(self, start: int, stop: int) -> dict:
        return {"index": self.index, "count": self.count, "start": start, "stop": stop}


# ---- merging -----------------------------------------------------------------------------
#: per-sample lists, concatenated in shard order
_PER_SAMPLE = {"margin", "entropy_final", "entropy_readout"}
#: per-sample means, weighted by shard size
_MEANS = {"acc_per_state", "mean_entropy_per_state", "P", "delta_H", "trigger_rate", "mean_perturbation"}
#: counts, summed
_COUNTS = {"attacked", "still_robust", "flipped", "queried"}


def merge_shards(shard_dirs: Sequence[os.PathLike], out: os.PathLike) -> Path:
    """Merge the state of complete shard folders into ``out``; returns the folder. The merged
    folder is an ordinary evaluation folder: ``robustdeq evaluate`` with the same settings
    resumes it (to write the outputs, or to add the whole-subset families)."""
    states = [json.loads((Path(d) / "state.json").read_text()) for d in shard_dirs]
    for d, s in zip(shard_dirs, states):
        if not s.get("identity", {}).get("shard"):
            raise ShardMergeError(f"{d} is not a shard (it was run without --shard)")
    order = sorted(range(len(states)), key=lambda i: states[i]["identity"]["shard"]["index"])
    states = [states[i] for i in order]
    dirs = [Path(shard_dirs[i]) for i in order]
    shards = [s["identity"]["shard"] for s in states]
    count = shards[0]["count"]
    if [s["index"] for s in shards] != list(range(count)) or any(s["count"] != count for s in shards):
        found = ", ".join(f"{s['index']}/{s['count']}" for s in shards)
        raise ShardMergeError(f"need shards 0/{count} .. {count - 1}/{count} exactly once each; got {found}")
    if any(a["stop"] != b["start"] for a, b in zip(shards, shards[1:])) or shards[0]["start"] != 0:
        raise ShardMergeError("the shards do not tile the subset (were they run with different --n or --block?)")
    identities = [{k: v for k, v in s["identity"].items() if k != "shard"} for s in states]
    for d, ident in zip(dirs[1:], identities[1:]):
        if ident != identities[0]:
            raise ShardMergeError(f"{d} evaluated another checkpoint, subset or settings than {dirs[0]}")
    if shards[-1]["stop"] != identities[0]["config"]["n"]:
        raise ShardMergeError("the shards do not cover the whole subset")
    job_names = [list(s["jobs"]) for s in states]  # in the order they ran (the report keeps it)
    for d, names in zip(dirs[1:], job_names[1:]):
        if set(names) != set(job_names[0]):
            missing = sorted(set(job_names[0]) ^ set(names))
            raise ShardMergeError(f"{d} has not finished the same jobs as {dirs[0]} (differ: {', '.join(missing)})")
    weights = [s["stop"] - s["start"] for s in shards]
    jobs = {name: _merge([s["jobs"][name] for s in states], weights, name) for name in job_names[0]}
    tensors = [torch.load(d / "state.pt", map_location="cpu", weights_only=True) for d in dirs]
    merged_tensors = {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(merged_tensors, out / "state.pt")
    state = {
        "identity": {**identities[0], "shard": None},
        "checkpoint": states[0].get("checkpoint"),
        "data": states[0].get("data"),
        "jobs": jobs,
        "best": states[0]["best"],
        "merged_from": [str(d) for d in dirs],
    }
    (out / "state.json").write_text(json.dumps(state))
    return out


def _merge(values: List[Any], weights: List[int], path: str) -> Any:
    first = values[0]
    if isinstance(first, dict):
        if any(set(v) != set(first) for v in values):
            raise ShardMergeError(f"{path}: the shards recorded different fields")
        if "ci95" in first:
            return _merge_proportion(values, weights, path)
        return {k: _merge_field(k, [v[k] for v in values], weights, f"{path}.{k}") for k in first}
    return _merge_field(path.rsplit(".", 1)[-1], values, weights, path)


def _merge_field(key: str, values: List[Any], weights: List[int], path: str) -> Any:
    if key == "correct" and isinstance(values[0], str):
        return "".join(values)
    if key in _PER_SAMPLE:
        return [x for v in values for x in v]
    if key == "seconds":
        return round(sum(values), 2)
    if key == "cost_vs_plain":
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None
    if key in ("max_perturbation", "finished"):  # the finishing time of a job: its last shard's
        return max(values)
    if key in _COUNTS:
        return sum(values)
    if key in _MEANS:
        return _weighted_mean(values, weights)
    if isinstance(values[0], dict):
        return _merge(values, weights, path)
    if any(v != values[0] for v in values):
        raise ShardMergeError(f"{path}: the shards disagree ({values[0]!r} vs another value); it should not depend "
                              "on the images, so the shards ran different code or settings")  # fmt: skip
    return values[0]


def _merge_proportion(values: List[dict], weights: List[int], path: str) -> dict:
    strings = [v["correct"] for v in values]
    if all(isinstance(s, str) for s in strings):
        joined = "".join(strings)
        out = Proportion.of(joined.count("1"), len(joined)).to_dict()
        extra = {k: _merge_field(k, [v[k] for v in values], weights, f"{path}.{k}")
                 for k in values[0] if k not in out}  # fmt: skip
        return {**out, **extra, "correct": joined}
    out = Proportion.of(sum(int(v["correct"]) for v in values), sum(int(v["n"]) for v in values)).to_dict()
    extra = {k: _merge_field(k, [v[k] for v in values], weights, f"{path}.{k}") for k in values[0] if k not in out}
    return {**out, **extra}


def _weighted_mean(values: List[Any], weights: List[int]) -> Any:
    total = sum(weights)
    if isinstance(values[0], list):
        return [_weighted_mean([v[i] for v in values], weights) for i in range(len(values[0]))]
    return sum(v * w for v, w in zip(values, weights)) / total
