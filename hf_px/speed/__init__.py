"""Speed: CPU latency measured side by side, and the plan that shrinks a model toward a requested speed-up."""

from .latency import LatencyResult, measure_latency

__all__ = ["LatencyResult", "measure_latency"]
