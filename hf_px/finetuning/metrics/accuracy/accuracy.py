"""Accuracy: the fraction of predictions equal to their reference (hf_px's offline metric script).

Loaded by path so it works without the Hub: ``evaluate.load(<this file>)``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions that equal the reference label (optionally weighted per example)."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return a fraction (default) or the count of correct predictions.
    sample_weight (list of float, optional): one weight per example.
Returns:
    accuracy (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        if correct.size == 0:
            return {"accuracy": float("nan")}
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
