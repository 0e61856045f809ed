"""The one-command pipeline: ``hf-px run config.yaml`` / ``hf_px.run(config)``."""

from .config import ConfigError, RunConfig
from .runner import RunError, RunResult, run

__all__ = ["ConfigError", "RunConfig", "RunError", "RunResult", "run"]
