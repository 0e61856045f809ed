"""Sparse kernels only where they pay: ``choose_kernels`` and ``hf_px.load(kernels=...)``.

Every decision here is forced with an injected timer: no test asserts anything about real timings (those are in
``scripts/bench_kernels.py``).
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from tiny_models import save_tiny_checkpoint, tiny

from hf_px.errors import ConfigError
from hf_px.export.serialization import load, save_pretrained
from hf_px.inference import (
    CSRLinear,
    KernelReport,
    choose_kernels,
    densified,
    densify,
    example_inputs,
    interleaved_median_ms,
)
from hf_px.inference import choose as choose_module
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.targets import prunable_parameters


def pruned(family: str = "bert", sparsity: float = 0.9, seed: int = 0) -> torch.nn.Module:
    model = tiny(family, seed=seed)
    g = torch.Generator().manual_seed(seed)
    apply_masks(model, {n: torch.rand(p.shape, generator=g) >= sparsity for n, p in prunable_parameters(model).items()})
    return model


def fake_timer(layer_csr: float = 0.5, model_csr: float | list[float] = 0.5, calls: list | None = None):
    """A timer that runs nothing: dense takes 1 ms, CSR ``layer_csr`` ms per layer and ``model_csr`` ms for the
    whole model (a list: one value per whole-model measurement, in turn)."""
    model_times = iter(model_csr) if isinstance(model_csr, list) else itertools.repeat(model_csr)

    def timer(fns, repeats, layer):
        assert set(fns) == {"dense", "sparse"} and repeats >= 1
        if calls is not None:
            calls.append(layer)
        return {"dense": 1.0, "sparse": layer_csr if layer is not None else next(model_times)}

    return timer


def csr_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, CSRLinear)]


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------------------- decisions
def test_csr_faster_converts_and_records_every_candidate():
    model = pruned()
    calls: list = []
    report = choose_kernels(model, (2, 8), timer=fake_timer(calls=calls))
    candidates = [layer.name for layer in report.layers if not layer.note]
    assert len(candidates) == 12  # 6 per block; pooler and classifier are not pruned
    assert calls == [*candidates, None, None]  # each candidate once, then the whole model twice
    assert sorted(csr_names(model)) == sorted(candidates) == sorted(report.sparse_layers)
    for layer in report.layers:
        if layer.name in candidates:
            assert (layer.dense_ms, layer.sparse_ms, layer.selected, layer.kernel) == (1.0, 0.5, "csr", "csr")
            assert layer.sparsity >= 0.7 and layer.rows == 16
        else:
            assert layer.kernel == "dense" and layer.dense_ms is None and "sparsity below" in layer.note
    assert (report.mode, report.batch_shape, report.dense_ms, report.ms, report.speedup) == ("auto", (2, 8), 1.0,
                                                                                               0.5, 2.0)
    assert not report.reverted and report.threads == torch.get_num_threads()
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert model.hf_px_kernels is report
    assert "12/14 linear layers CSR" in str(report)


def test_csr_slower_leaves_every_layer_dense():
    model = pruned()
    calls: list = []
    report = choose_kernels(model, (1, 8), timer=fake_timer(layer_csr=2.0, calls=calls))
    assert csr_names(model) == [] and report.sparse_layers == []
    assert None not in calls  # nothing selected: no whole-model comparison
    assert all(layer.selected == "dense" for layer in report.layers)
    assert report.speedup == 1.0 and report.dense_ms is None and "no layer" in report.note


def test_a_gain_within_min_speedup_is_not_taken():
    model = pruned()
    report = choose_kernels(model, (1, 8), timer=fake_timer(layer_csr=0.99), min_speedup=1.05)
    assert csr_names(model) == [] and report.sparse_layers == []


def test_whole_model_slower_reverts_everything():
    model = pruned()
    report = choose_kernels(model, (1, 8), timer=fake_timer(layer_csr=0.5, model_csr=1.2))
    assert csr_names(model) == [] and report.reverted
    assert all(layer.kernel == "dense" for layer in report.layers)
    assert sum(layer.selected == "csr" for layer in report.layers) == 12  # what the layers alone would have chosen
    assert report.ms == report.dense_ms == 1.0 and report.speedup == 1.0
    assert "reverted" in report.note and "1.20 ms" in report.note
    assert report.to_dict()["reverted"] is True


def test_a_gain_the_second_measurement_does_not_confirm_is_reverted():
    model = pruned()
    calls: list = []
    report = choose_kernels(model, (1, 8), timer=fake_timer(model_csr=[0.5, 0.99], calls=calls))
    assert calls[-2:] == [None, None] and csr_names(model) == [] and report.reverted
    assert "0.99 ms" in report.note and report.speedup == 1.0


def test_the_report_keeps_the_smaller_of_two_gains():
    model = pruned()
    report = choose_kernels(model, (1, 8), timer=fake_timer(model_csr=[0.5, 0.8]))
    assert len(csr_names(model)) == 12 and (report.dense_ms, report.ms, report.speedup) == (1.0, 0.8, 1.25)


def test_layers_below_min_sparsity_are_not_timed():
    model = pruned(sparsity=0.5)
    calls: list = []
    report = choose_kernels(model, (1, 8), timer=fake_timer(calls=calls))
    assert calls == [] and csr_names(model) == []
    assert all(layer.note for layer in report.layers)


def test_tied_weights_are_never_converted():
    model = tiny("gpt2")  # lm_head.weight is the token embedding
    report = choose_kernels(model, (1, 8), timer=fake_timer(), min_sparsity=0.0)
    head = next(layer for layer in report.layers if layer.name == "lm_head")
    assert "tied" in head.note and head.kernel == "dense"
    assert type(model.lm_head) is torch.nn.Linear


def test_choosing_twice_starts_from_dense():
    model = pruned()
    choose_kernels(model, (1, 8), timer=fake_timer())
    report = choose_kernels(model, (1, 8), timer=fake_timer(layer_csr=2.0))
    assert csr_names(model) == [] and report.sparse_layers == []


# ------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (3, 7)])
def test_outputs_with_csr_equal_dense(shape):
    model = pruned()
    dense = copy.deepcopy(model)
    choose_kernels(model, (2, 8), timer=fake_timer())
    assert len(csr_names(model)) == 12
    inputs = example_inputs(model, shape, seed=1)
    torch.testing.assert_close(logits(model, inputs), logits(dense, inputs), rtol=0, atol=1e-5)


def test_vision_model_outputs_equal_dense():
    model = pruned("vit")
    dense = copy.deepcopy(model)
    report = choose_kernels(model, (2, 8), timer=fake_timer())
    assert report.sparse_layers
    inputs = example_inputs(model, (2, 8), seed=1)
    torch.testing.assert_close(logits(model, inputs), logits(dense, inputs), rtol=0, atol=1e-5)


def test_real_timer_keeps_outputs_and_contract():
    """The default timer on a tiny model: whatever it decides, outputs match and the report is consistent."""
    model = pruned(sparsity=0.95)
    dense = copy.deepcopy(model)
    report = choose_kernels(model, (1, 8), repeats=2, model_repeats=2)
    inputs = example_inputs(model, (1, 8))
    torch.testing.assert_close(logits(model, inputs), logits(dense, inputs), rtol=0, atol=1e-5)
    assert sorted(csr_names(model)) == sorted(report.sparse_layers)
    assert report.speedup >= 1.0
    assert all(layer.dense_ms > 0 and layer.sparse_ms > 0 for layer in report.layers if not layer.note)


def test_interleaved_timer_alternates_order_and_warms_up():
    order: list[str] = []
    fns = {"dense": lambda: order.append("d"), "sparse": lambda: order.append("s")}
    times = interleaved_median_ms(fns, repeats=3)
    assert order == ["d", "s", "d", "s", "s", "d", "d", "s"]  # warm-up, then alternating rounds
    assert set(times) == {"dense", "sparse"} and all(t >= 0 for t in times.values())


# ------------------------------------------------------------------------------------------- load
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = pruned()
    root = tmp_path_factory.mktemp("kernels")
    for fmt in ("dense", "sparse"):
        save_pretrained(model, root / fmt, format=fmt, card=False)
    return root, model


@pytest.fixture
def csr_wins(monkeypatch):
    monkeypatch.setattr(choose_module, "interleaved_median_ms", fake_timer())


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_load_auto_on_both_formats(saved, fmt, csr_wins):
    root, reference = saved
    model = load(root / fmt, kernels="auto", batch_shape=(2, 8))
    assert len(csr_names(model)) == 12 and not model.training
    report = model.hf_px_kernels
    assert isinstance(report, KernelReport) and report.batch_shape == (2, 8) and report.speedup == 2.0
    json.dumps(report.to_dict())
    inputs = example_inputs(model, (2, 8))
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=0, atol=1e-5)


def test_load_auto_defaults_to_1x128_and_plain_checkpoints_work(tmp_path, csr_wins):
    folder = save_tiny_checkpoint(tmp_path / "stock")  # transformers' own save, no hf_px.json, nothing pruned
    model = load(folder, kernels="auto")
    assert model.hf_px_kernels.batch_shape == (1, 128)
    assert csr_names(model) == [] and "no layer is a candidate" in model.hf_px_kernels.note


def test_load_dense_and_default(saved, csr_wins):
    root, _ = saved
    plain = load(root / "sparse")
    assert not hasattr(plain, "hf_px_kernels") and csr_names(plain) == []
    dense = load(root / "sparse", kernels="dense")
    assert csr_names(dense) == [] and dense.hf_px_kernels.mode == "dense"
    assert dense.hf_px_kernels.layers[0].sparsity > 0.7 and "all 14" in str(dense.hf_px_kernels)


@pytest.mark.parametrize(("kwargs", "fix"), [
    ({"kernels": "csr"}, "kernels='auto'"),
    ({"kernels": True}, "kernels='auto'"),
    ({"batch_shape": (1, 128)}, "pass kernels='auto' or drop batch_shape"),
    ({"kernels": "dense", "batch_shape": (1, 128)}, "drop batch_shape"),
    ({"kernels": "auto", "batch_shape": (0, 128)}, "batch_shape=(1, 128)"),
    ({"kernels": "auto", "batch_shape": (1,)}, "two positive integers"),
    ({"kernels": "auto", "batch_shape": "1x128"}, "two positive integers"),
    ({"kernels": "auto", "dtype": torch.bfloat16}, "drop dtype"),
    ({"kernels": "auto", "torch_dtype": "float16"}, "drop torch_dtype"),
    ({"kernels": "auto", "device_map": "cuda"}, "drop device_map"),
])
def test_bad_load_arguments_fail_before_loading(tmp_path, kwargs, fix):
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "does-not-exist", **kwargs)  # refused before the missing folder is even looked at
    assert fix in str(err.value)


def test_too_many_tokens_names_the_limit(saved, csr_wins):
    root, _ = saved
    with pytest.raises(ConfigError, match=r"at most 64; pass batch_shape=\(1, 64\)"):
        load(root / "dense", kernels="auto", batch_shape=(1, 65))


@pytest.mark.parametrize(("kwargs", "fix"), [
    ({"min_speedup": 0.5}, "min_speedup must be >= 1"),
    ({"min_sparsity": 1.5}, "min_sparsity must be"),
    ({"repeats": 0}, "repeats must be a positive integer"),
    ({"timer": "fast"}, "timer must be a callable"),
])
def test_bad_choose_arguments(kwargs, fix):
    with pytest.raises(ConfigError, match=fix):
        choose_kernels(pruned(), (1, 8), **kwargs)


def test_inputs_it_cannot_build_name_the_fix():
    with pytest.raises(ConfigError, match=r"pass inputs="):
        choose_kernels(torch.nn.Sequential(torch.nn.Linear(4, 4)), (1, 8))
    net = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with torch.no_grad():
        net[0].weight[:, 2:] = 0
    report = choose_kernels(net, (1, 8), inputs={"input": torch.randn(8, 16)}, timer=fake_timer())
    assert report.layers[0].rows == 8 and csr_names(net) == ["0"]


# ------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_saving_a_model_with_csr_layers_round_trips(tmp_path, fmt):
    model = pruned()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    choose_kernels(model, (1, 8), timer=fake_timer())
    out = save_pretrained(model, tmp_path / "out", format=fmt, card=False)
    assert len(csr_names(model)) == 12  # the CSR kernels are back after saving
    info = json.loads((out / "hf_px.json").read_text())
    assert info["masks"]["num_masked_tensors"] == 12  # masks were read from the densified layers
    got = load(out).state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_stock_save_and_state_dict_of_csr_layers_are_complete(tmp_path):
    model = pruned()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    choose_kernels(model, (1, 8), timer=fake_timer())
    assert set(model.state_dict()) == set(expected)
    model.save_pretrained(tmp_path / "stock")  # transformers' own save sees nn.Linear keys
    got = load(tmp_path / "stock").state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    fresh = pruned(seed=1)
    choose_kernels(fresh, (1, 8), timer=fake_timer())
    fresh.load_state_dict(expected)  # CSR layers rebuild from dense weights
    with densified(fresh):
        assert all(torch.equal(fresh.state_dict()[k], expected[k]) for k in expected)


def test_csr_model_deepcopies_refuses_training_and_densifies_exactly():
    model = pruned()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    choose_kernels(model, (1, 8), timer=fake_timer())
    twin = copy.deepcopy(model)
    assert len(csr_names(twin)) == 12
    inputs = example_inputs(model, (1, 8))
    assert torch.equal(logits(twin, inputs), logits(model, inputs))
    twin.train()
    with pytest.raises(RuntimeError, match="densify"):
        twin(**inputs)
    densify(model)
    assert csr_names(model) == []
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
