"""Evaluation: accuracy-matrix metrics, model-agnostic scorers and reports.

* :mod:`gere_ds.evaluation.metrics`: AP, BWT, FWT, forgetting, F1 (pure functions),
* :mod:`gere_ds.evaluation.scoring`: task accuracy (rank / generate), MMLU, perplexity,
  eval-file loading with validation, ZeRO-3-safe sharding over ranks,
* :mod:`gere_ds.evaluation.report`: metrics.json / metrics.md / accuracy_matrix.png and
  TensorBoard logging.

Submodules are not imported here so that light users (eval/compare.py) do not pull in torch.
"""
