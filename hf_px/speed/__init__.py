"""Speed: CPU latency measured side by side, and the plan that shrinks a model toward a requested speed-up."""

from .latency import LatencyResult, measure_latency
from .plan import SpeedConfig, SpeedPlan, apply_plan, plan_speed

__all__ = ["LatencyResult", "SpeedConfig", "SpeedPlan", "apply_plan", "measure_latency", "plan_speed"]
