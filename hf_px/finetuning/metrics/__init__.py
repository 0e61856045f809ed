"""Evaluation metrics that work offline.

``evaluate.load("accuracy")`` fetches its script from the Hub, which fails without network. hf_px ships its own
short metric scripts (accuracy, f1, perplexity) inside the package and loads them by path; any other name (or a
path to a script) is passed to ``evaluate.load`` unchanged, so Hub metrics stay usable online.

Example:
    >>> from hf_px.finetuning.metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[1, 0, 1], references=[1, 1, 1])["accuracy"]
    0.6666666666666666
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import InputNotFoundError

_HERE = os.path.dirname(os.path.abspath(__file__))

#: Metric names answered by the scripts shipped in this package.
SHIPPED_METRICS = ("accuracy", "f1", "perplexity")


def metric_script(name: str) -> str:
    """Path of the shipped script for ``name`` (one of :data:`SHIPPED_METRICS`)."""
    if name not in SHIPPED_METRICS:
        raise ValueError(f"hf_px ships no metric {name!r}; shipped: {', '.join(SHIPPED_METRICS)}.")
    return os.path.join(_HERE, name, f"{name}.py")


def load_metric(name: str, **kwargs: Any):
    """An ``evaluate`` metric: a shipped script for known names, else ``evaluate.load(name)``.

    Keyword arguments go to ``evaluate.load`` (e.g. ``keep_in_memory=True`` so that several processes never
    share cache files).
    """
    import evaluate

    if name in SHIPPED_METRICS:
        return evaluate.load(metric_script(name), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except FileNotFoundError as err:
        raise InputNotFoundError(
            f"could not load the metric {name!r} ({err}). Offline, set evaluate.metrics to a shipped metric "
            f"({', '.join(SHIPPED_METRICS)}) or the path of a local evaluate metric script."
        ) from err
