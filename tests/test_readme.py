"""The README's first Python block (the API tour) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow  # prunes the packaged MiniLM
def test_the_api_tour_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves to out/
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md (first python block)", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert result.report["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert (tmp_path / "out" / "model.safetensors").is_file()
