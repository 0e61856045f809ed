"""Validated configuration dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PruneConfig:
    """How to prune.

    Args:
        method: scoring method, a name from ``hf_px.scoring.available_methods()`` (``px`` by default).
        sparsity: fraction of the prunable weights to remove, in [0, 1).
        rounds: number of iterative rounds; density follows d_r = d^(r/R) with one global threshold.
        qk_score: how PX ranks the off-path matrices (Q/K, a gated MLP's gate) inside their block:
            ``ntk_diag`` (Hutchinson estimate of the exact NTK diagonal) or ``magnitude``.
        a_gate: A-pass gate for smooth activations: ``secant`` (g = φ(z)/z, reproduces the forward pass) or
            ``bound`` (G = max(|φ(z)/z|, |φ'(z)|), certifies the trace bound).
        hutchinson_probes: Rademacher probes per batch for the NTK-diagonal scores.
        b_length: PX on encoders: sequence length of the B pass, which sets how much attention (token-route) paths
            count against skip and MLP paths. ``None``: the calibration set's mean real length, every token route
            counted once (px.md §8.3); ``1``: no token-route factor.
        rescale: divide the residual stream by a fixed constant at every block boundary in the A pass
            (``None``: hidden_size * max(hidden_size, intermediate_size)); keeps float64 from overflowing.
        min_density_ratio: layer-collapse guard: every prunable matrix keeps at least this fraction of the round's
            density (its best-scored weights). 0 gives pure global-threshold PX; residual branches can then be
            pruned away entirely, because paths can bypass a block through the skip connection.
        generic: prune unregistered architectures (every Linear in the repeated blocks).
        seed: seed for random scores and probes.
        pcn: optional PCN width reduction applied before PX (``hf_px.pcn.PCNConfig``).

    Example:
        >>> PruneConfig(method="px", sparsity=0.9, rounds=20).density
        0.09999999999999998
    """

    method: str = "px"
    sparsity: float = 0.9
    rounds: int = 100
    qk_score: str = "ntk_diag"
    a_gate: str = "secant"
    hutchinson_probes: int = 1
    b_length: int | None = None
    rescale: float | None = None
    min_density_ratio: float = 0.1
    generic: bool = False
    seed: int = 0
    pcn: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .scoring import available_methods

        if self.method not in available_methods():
            raise ValueError(
                f"unknown pruning method {self.method!r}; choose one of {', '.join(available_methods())}."
            )
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(
                f"sparsity must be in [0, 1) (the fraction of prunable weights removed), got {self.sparsity!r}; "
                "e.g. 0.9 keeps 10% of the weights."
            )
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}.")
        if self.qk_score not in ("ntk_diag", "magnitude"):
            raise ValueError(f"qk_score must be 'ntk_diag' or 'magnitude', got {self.qk_score!r}.")
        if self.a_gate not in ("secant", "bound"):
            raise ValueError(f"a_gate must be 'secant' or 'bound', got {self.a_gate!r}.")
        if self.hutchinson_probes < 1:
            raise ValueError(f"hutchinson_probes must be >= 1, got {self.hutchinson_probes}.")
        if self.b_length is not None and (not isinstance(self.b_length, int) or self.b_length < 1):
            raise ValueError(f"b_length must be an integer >= 1 or None (the mean real length), got {self.b_length!r}.")
        if not 0.0 <= self.min_density_ratio <= 1.0:
            raise ValueError(f"min_density_ratio must be in [0, 1], got {self.min_density_ratio}.")
        if self.rescale is not None and not self.rescale > 0:
            raise ValueError(f"rescale must be a positive constant or None, got {self.rescale}.")

    @property
    def density(self) -> float:
        return 1.0 - float(self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.pcn is not None and hasattr(self.pcn, "to_dict"):
            out["pcn"] = self.pcn.to_dict()
        return out
