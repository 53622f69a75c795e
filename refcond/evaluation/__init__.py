"""Evaluating compositions: ``refcond eval`` and ``refcond ablate`` (see docs/evaluation.md).

- :func:`evaluate` generates every sample of an evaluation set (:func:`read_eval_set`,
  :func:`read_dreambench`) and scores the images with metric plugins, resumably and across processes;
- :func:`bootstrap` and :func:`paired_difference` give means with 95 % bootstrap intervals.
"""

from refcond.evaluation.datasets import EvalSample, load_eval_set, read_dreambench, read_eval_set
from refcond.evaluation.runner import DEFAULT_METRICS, EvalResult, build_metrics, evaluate, image_seed
from refcond.evaluation.statistics import Estimate, bootstrap, paired_difference

__all__ = [
    "DEFAULT_METRICS",
    "Estimate",
    "EvalResult",
    "EvalSample",
    "bootstrap",
    "build_metrics",
    "evaluate",
    "image_seed",
    "load_eval_set",
    "paired_difference",
    "read_dreambench",
    "read_eval_set",
]
