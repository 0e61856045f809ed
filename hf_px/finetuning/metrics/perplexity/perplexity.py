"""Perplexity from summed token negative log-likelihoods (hf_px's offline metric script).

Unlike the Hub's perplexity metric this one runs no model: the training loop gives, per sequence, the summed
NLL (in nats) of its predicted tokens and their count, so the score is exact over any batching or sharding.
Loaded by path so it works without the Hub: ``evaluate.load(<this file>)``.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "exp(total negative log-likelihood / total predicted tokens) over a corpus."
_INPUTS = """
Args:
    nll_sum (list of float): summed negative log-likelihood (natural log) of each sequence's predicted tokens.
    num_tokens (list of int): number of predicted tokens of each sequence.
Returns:
    perplexity (float), loss (float: mean NLL per token)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"nll_sum": datasets.Value("float64"),
                                        "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, num_tokens):
        tokens = sum(int(n) for n in num_tokens)
        if tokens == 0:
            raise ValueError("perplexity needs at least one predicted token (every label was -100 or padding).")
        loss = sum(float(x) for x in nll_sum) / tokens
        return {"perplexity": math.exp(loss), "loss": loss}
