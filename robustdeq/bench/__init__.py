"""``robustdeq bench``: the in-process speed benchmark of plain inference and of the defense.

* plain inference in eager PyTorch and through ONNX Runtime, per batch size;
* Algorithm 1 of paper 1 over the T_f x R grid of its Table 10, against the defense's
  operation-count floor (docs/design.md §3);
* where the time goes (stem, solve, defense, head) via the library's stage markers;
* the entropy-gated defense with the robustness card's gate, on clean and PGD-10 inputs;
* optional trials of faster PyTorch paths (channels-last, ``torch.compile``), and
  training-step throughput (paper 1 Table 9).
"""

from .run import DEFAULT_BATCH_SIZES, run_bench

__all__ = ["run_bench", "DEFAULT_BATCH_SIZES"]
