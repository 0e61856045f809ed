"""PCN configuration and report objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

MODES = ("structured", "projection")
SCORES = ("leverage", "l1", "weighted", "output")
_DEFAULT_VARIANCE = 0.99


@dataclass
class PCNConfig:
    """How PCN reduces widths before PX scoring.

    Give exactly one of ``variance`` (keep the smallest number of principal components whose cumulative
    explained variance reaches it) and ``width`` (an absolute width, or a fraction of the layer width when a
    float in (0, 1]); a ``width`` replaces the default ``variance``. Widths found from ``variance`` or a fraction are rounded up to ``multiple_of`` and capped
    at the layer width; an absolute integer width is used as given.

    Args:
        variance: explained-variance target in (0, 1].
        width: absolute width (int) or fraction of the layer width (float in (0, 1]).
        mode: ``structured`` (FFN neuron selection, stock reload) or ``projection`` (frozen per-block
            Q/K/V input basis; BERT family; needs ``hf_px.pcn`` or ``trust_remote_code=True`` to reload).
        multiple_of: round chosen widths up to a multiple of this.
        score: neuron score in structured mode: ``leverage`` (sum of squared loadings on the top-k
            directions), ``l1`` (PCN's rule), ``weighted`` (squared loadings weighted by the eigenvalues) or
            ``output`` (``weighted`` times the squared norm of the neuron's output column; the default: it beat
            ``leverage`` before and after fine-tuning in ``scripts/bench_pcn.py`` on MiniLM).
        uniform: one width for every layer (the max of the per-layer choices). With ``uniform=False`` structured
            mode zero-pads every layer to the largest width and records the true widths in
            ``config.hf_px_pcn``; projection mode stores one rank per block.
        mean_compensation: fold the mean of dropped neurons into the FFN output bias (structured mode).
        project_ffn_input: projection mode also projects the FFN input (``proj_f``).
        calibration_factor: calibration tokens per unit of the widest layer PCN measures (the FFN width in
            structured mode, the hidden size in projection mode). A PCA of a D-wide layer from fewer than D
            tokens is rank-deficient (every width reaches explained variance 1.0), so ``hf-px run`` draws PCN a
            sample of its own with at least this many tokens per unit of width (capped by the training split);
            0 uses the pruning calibration batches. :func:`~hf_px.pcn.apply_pcn` uses the batches it is given
            and warns when they hold fewer tokens than the components a layer keeps.

    Example:
        >>> PCNConfig(variance=0.99).mode
        'structured'
        >>> PCNConfig(variance=None, width=0.5, mode="projection").width
        0.5
    """

    variance: float | None = _DEFAULT_VARIANCE
    width: int | float | None = None
    mode: str = "structured"
    multiple_of: int = 8
    score: str = "output"
    uniform: bool = True
    mean_compensation: bool = True
    project_ffn_input: bool = False
    calibration_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.width is not None and self.variance == _DEFAULT_VARIANCE:
            # PCNConfig(width=...) must not clash with the default variance target; a different variance
            # given together with a width is still an error below
            self.variance = None
        if (self.variance is None) == (self.width is None):
            raise ValueError(
                "give exactly one of PCNConfig.variance (explained-variance target, e.g. 0.99) and "
                f"PCNConfig.width (absolute width or fraction), got variance={self.variance!r}, width={self.width!r}."
            )
        if self.variance is not None:
            if isinstance(self.variance, bool) or not isinstance(self.variance, (int, float)) \
                    or not 0.0 < float(self.variance) <= 1.0:
                raise ValueError(
                    f"PCNConfig.variance must be in (0, 1] (fraction of variance kept), got {self.variance!r}; "
                    "e.g. 0.99."
                )
            self.variance = float(self.variance)
        if self.width is not None:
            if isinstance(self.width, bool) or not isinstance(self.width, (int, float)):
                raise ValueError(f"PCNConfig.width must be an int or a float, got {self.width!r}.")
            if isinstance(self.width, float) and not 0.0 < self.width <= 1.0:
                raise ValueError(
                    f"a float PCNConfig.width is a fraction of the layer width and must be in (0, 1], got "
                    f"{self.width!r}; pass an int for an absolute width."
                )
            if isinstance(self.width, int) and self.width < 1:
                raise ValueError(f"an absolute PCNConfig.width must be >= 1, got {self.width!r}.")
        if self.mode not in MODES:
            raise ValueError(f"PCNConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.score not in SCORES:
            raise ValueError(f"PCNConfig.score must be one of {', '.join(SCORES)}, got {self.score!r}.")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"PCNConfig.multiple_of must be an integer >= 1, got {self.multiple_of!r}.")
        if isinstance(self.calibration_factor, bool) or not isinstance(self.calibration_factor, (int, float)) \
                or not 0.0 <= float(self.calibration_factor) <= 1000.0:
            raise ValueError("PCNConfig.calibration_factor must be a number in [0, 1000] (calibration tokens per "
                             f"unit of layer width; 0: the pruning batches), got {self.calibration_factor!r}.")
        self.calibration_factor = float(self.calibration_factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PCNLayerReport:
    layer: int
    kind: str  # "ffn" (structured), "qkv_in" or "ffn_in" (projection)
    width_before: int
    width_after: int
    explained_variance: float  # PCA variance fraction of the top ``components`` directions
    components: int  # principal components the width choice / neuron scores used
    selected_variance: float | None = None  # structured: variance share of the kept neurons

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FLOPS_DEFINITION = ("matmul FLOPs per token: 2 x the weights of every Linear layer (blocks, pooler, heads); "
                    "embedding lookups and attention scores not counted")


@dataclass
class PCNReport:
    """What :func:`hf_px.pcn.apply_pcn` did. ``model`` is the (possibly converted) model, not serialised.

    ``flops_before``/``flops_after`` follow :data:`FLOPS_DEFINITION` (:func:`hf_px.pcn.structured.linear_flops`,
    the count ``hf-px run``'s size table uses too). ``undersampled`` is True when some layer kept at least as many
    components as there were calibration tokens: its PCA had rank below the width, so its explained variance
    (1.0 there) measures the sample size, not the layer.
    """

    config: PCNConfig
    layers: list[PCNLayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    calibration_tokens: int = 0
    undersampled: bool = False
    model: nn.Module | None = field(default=None, repr=False)

    def undersampled_layers(self) -> list[int]:
        """Layers that kept at least as many components as there were calibration tokens."""
        return [lr.layer for lr in self.layers if self.calibration_tokens <= max(lr.width_after, lr.components)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "layers": [lr.to_dict() for lr in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_definition": FLOPS_DEFINITION,
            "calibration_tokens": self.calibration_tokens,
            "undersampled": self.undersampled,
        }

    def __str__(self) -> str:
        rows = [f"PCN ({self.config.mode}) on {self.calibration_tokens} calibration tokens"
                + (" (fewer than the components kept: explained variance is not measured)" if self.undersampled
                   else ""),
                f"{'layer':>5} {'kind':>8} {'width':>13} {'k_pca':>6} {'expl.var':>9} {'sel.var':>8}"]
        for lr in self.layers:
            sel = "" if lr.selected_variance is None else f"{lr.selected_variance:.4f}"
            rows.append(f"{lr.layer:>5} {lr.kind:>8} {lr.width_before:>6}->{lr.width_after:<6} "
                        f"{lr.components:>6} {lr.explained_variance:>9.4f} {sel:>8}")
        rows.append(f"params {self.params_before:,} -> {self.params_after:,} "
                    f"(x{self.params_after / max(self.params_before, 1):.3f}); matmul FLOPs/token "
                    f"{self.flops_before:,} -> {self.flops_after:,} "
                    f"(x{self.flops_after / max(self.flops_before, 1):.3f})")
        return "\n".join(rows)
