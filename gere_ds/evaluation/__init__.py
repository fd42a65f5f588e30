"""Evaluation: accuracy-matrix metrics, model-agnostic scorers and reports.

* :mod:`gere_ds.evaluation.metrics`: AP, BWT, FWT, forgetting, F1 (pure functions),
* :mod:`gere_ds.evaluation.scoring`: task accuracy (rank / generate), eval-file loading with
  validation, and :class:`~gere_ds.evaluation.scoring.EvalSuite`, a model's whole evaluation,
* :mod:`gere_ds.evaluation.general`: MMLU-style multiple choice and perplexity,
* :mod:`gere_ds.evaluation.general_kinds`: the registry of general evaluations (load, score,
  per-example outcomes, metric name), one class per ``eval.general.<i>.kind``,
* :mod:`gere_ds.evaluation.batching`: padding ids, samples, ZeRO-3-safe sharding over ranks,
* :mod:`gere_ds.evaluation.report`: metrics.json / metrics.md / accuracy_matrix.png and
  TensorBoard logging.

Submodules are not imported here so that light users (eval/compare.py) do not pull in torch.
"""
