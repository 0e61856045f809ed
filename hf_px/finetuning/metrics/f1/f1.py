"""F1 score from per-class true/false positives and false negatives (hf_px's offline metric script).

Loaded by path so it works without the Hub: ``evaluate.load(<this file>)``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Harmonic mean of precision and recall, for binary or multi-class labels."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str): "binary" (score of ``pos_label``, the default), "macro" (unweighted mean over classes),
        "micro" (from global counts) or "weighted" (mean weighted by each class's support).
    pos_label (int): the positive class for average="binary" (default 1).
Returns:
    f1 (float)
"""


def _safe_div(num, den):
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        pred, ref = np.asarray(predictions), np.asarray(references)
        classes = np.union1d(pred, ref)
        if average == "binary":
            if len(classes) > 2:
                raise ValueError(f"average='binary' needs two classes, found {len(classes)}; "
                                 "use average='macro', 'micro' or 'weighted'.")
            classes = np.array([pos_label])
        elif average not in ("macro", "micro", "weighted"):
            raise ValueError(f"unknown average {average!r}; use 'binary', 'macro', 'micro' or 'weighted'.")
        tp = np.array([np.sum((pred == c) & (ref == c)) for c in classes], dtype=np.float64)
        fp = np.array([np.sum((pred == c) & (ref != c)) for c in classes], dtype=np.float64)
        fn = np.array([np.sum((pred != c) & (ref == c)) for c in classes], dtype=np.float64)
        if average == "micro":
            tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
        per_class = _safe_div(2 * tp, 2 * tp + fp + fn)
        if average == "weighted":
            support = tp + fn
            return {"f1": float((per_class * support).sum() / support.sum()) if support.sum() else 0.0}
        return {"f1": float(per_class.mean()) if per_class.size else 0.0}
