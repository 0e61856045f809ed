"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine two threads fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Put back what a test may change for the whole process: the CLI turns library progress bars off for good
    (right for a command, wrong for the next test), and SIGINT's disposition is inherited by child processes."""
    import signal

    import datasets
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    datasets_bars = not datasets.utils.are_progress_bars_disabled()
    sigint = signal.getsignal(signal.SIGINT)
    yield
    (transformers.utils.logging.enable_progress_bar if bars else transformers.utils.logging.disable_progress_bar)()
    (datasets.enable_progress_bars if datasets_bars else datasets.disable_progress_bars)()
    if signal.getsignal(signal.SIGINT) is not sigint and sigint is not None:
        signal.signal(signal.SIGINT, sigint)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running :class:`hub_server.FakeHub`, with huggingface_hub pointed at it and its token in HF_TOKEN.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is imported, so the
    constants are patched as well as the environment.
    """
    from hub_server import FakeHub
    from huggingface_hub import constants

    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield hub


@pytest.fixture
def hub_server(fake_hub):
    """The fake Hub's endpoint URL (``http://127.0.0.1:<port>``)."""
    return fake_hub.endpoint
