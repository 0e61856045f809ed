"""Every Python block of the README runs as written.

The blocks are one tour: later ones use names defined by earlier ones (``model``, ``calib``, ``result``), so they
run in order in one namespace, from a folder that looks like a clone's root (``scripts/`` is there), with the Hub
calls answered by the test Hub server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_the_blocks_this_test_checks():
    blocks = python_blocks()
    assert len(blocks) >= 6
    assert "hf_px.prune(" in blocks[0] and "hf_px.run(" in "".join(blocks)


@pytest.mark.slow  # prunes and fine-tunes the packaged MiniLM, runs the tiny pipeline
def test_every_python_block_runs_as_written(tmp_path, monkeypatch, fake_hub):
    from huggingface_hub import HfApi

    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(python_blocks(), 1):
        exec(compile(block, f"README.md (python block {i})", "exec"), namespace)  # noqa: S102

    # the API tour pruned to 90% and saved a checkpoint; the PCN block re-pruned at 80%
    assert namespace["result"].report["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert (tmp_path / "px-sparse" / "hf_px.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    assert namespace["run"].stages["finetune"] == "ran"
    assert Path(namespace["run"].model_dir).is_dir()
    assert "accuracy" in str(namespace["out"].metrics)
    assert namespace["llama"].config.num_attention_heads == 2
    files = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.token).list_repo_files("user/minilm-px90")
    assert "hf_px.json" in files and "README.md" in files
