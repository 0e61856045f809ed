"""Gradual pruning while fine-tuning: the cubic schedule, exact masks at every step, resume, and refusals."""

from __future__ import annotations

import datasets
import pytest
import torch
from tiny_models import VOCAB, tiny

import hf_px
from hf_px.errors import ConfigError
from hf_px.finetuning.gradual import GradualConfig
from hf_px.finetuning.loop import FinetuneConfig, finetune
from hf_px.pruning.targets import collect_targets


def _data(n: int = 48, length: int = 8, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n,
                                       "label": [r[0] % 3 for r in ids]})


def _gradual(method: str = "magnitude", sparsity: float = 0.8, **kwargs) -> GradualConfig:
    base = dict(every=2, end=0.5)
    return GradualConfig(prune=hf_px.PruneConfig(method=method, sparsity=sparsity), **{**base, **kwargs})


def _cfg(gradual: GradualConfig, **kwargs) -> FinetuneConfig:
    base = dict(epochs=2, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0, log_every=1, progress_bar=False)
    return FinetuneConfig(**{**base, **kwargs}, gradual=gradual)


def _prunable(model) -> dict[str, torch.Tensor]:
    return {t.param_name: t.param.detach() for t in collect_targets(model)}


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_is_cubic_from_initial_to_final_between_start_and_end():
    cfg = _gradual(sparsity=0.9, initial_sparsity=0.3, start=0.1, end=0.6, every=7)
    sched = cfg.schedule(total_steps=100)
    steps = [s for s, _ in sched]
    assert steps[0] == 10 and steps[-1] == 60 and all(b - a <= 7 for a, b in zip(steps, steps[1:], strict=False))
    for step, sparsity in sched:  # independent evaluation of s(t) = s_f + (s_i - s_f)(1 - (t - t0)/(te - t0))^3
        frac = (step - 10) / 50
        assert sparsity == pytest.approx(0.9 - 0.6 * (1 - frac) ** 3)
    assert sched[0][1] == pytest.approx(0.3) and sched[-1][1] == pytest.approx(0.9)
    values = [s for _, s in sched]
    assert values == sorted(values)


def test_schedule_collapses_to_one_step_when_start_equals_end():
    assert _gradual(start=0.5, end=0.5).schedule(10) == [(5, pytest.approx(0.8))]


@pytest.mark.parametrize("kwargs, match", [
    ({"initial_sparsity": 0.8}, "initial_sparsity"),
    ({"initial_sparsity": -0.1}, "initial_sparsity"),
    ({"start": 1.0}, "start"),
    ({"start": 0.5, "end": 0.4}, "end"),
    ({"end": 1.5}, "end"),
    ({"every": 0}, "every"),
    ({"calibration_batches": True}, "calibration_batches"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gradual(**kwargs)


def test_prune_must_be_a_prune_config_and_dicts_convert():
    with pytest.raises(TypeError, match="PruneConfig"):
        GradualConfig(prune="px")
    cfg = FinetuneConfig(gradual={"prune": {"method": "magnitude", "sparsity": 0.5}, "every": 3})
    assert isinstance(cfg.gradual, GradualConfig) and cfg.gradual.prune.sparsity == 0.5
    assert cfg.to_dict()["gradual"]["prune"]["method"] == "magnitude"


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["magnitude", "px"])
def test_sparsity_rises_on_schedule_and_ends_exact_with_pruned_weights_zero(method):
    model = tiny("bert")
    total = sum(p.numel() for p in _prunable(model).values())
    cfg = _cfg(_gradual(method), epochs=2)  # 48 examples / 8 = 6 steps per epoch: 12 steps, pruning at 0,2,4,6
    out = finetune(model, _data(), config=cfg)
    events = out.extras["gradual"]
    assert [e["step"] for e in events] == [0, 2, 4, 6]
    reached = [e["sparsity"] for e in events]
    assert reached == sorted(reached) and reached[-1] == pytest.approx(0.8, abs=1 / total)
    for e in events:  # every step is exact, not just the last
        assert e["sparsity"] == pytest.approx(e["target_sparsity"], abs=1 / total)
    weights = _prunable(out.model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == pytest.approx(0.8 * total, abs=1)
    assert out.sparsity["pruned_all_zero"] and out.sparsity["density_before"] == 1.0
    assert out.sparsity["density_after"] == pytest.approx(0.2, abs=1 / total)


def test_pruned_weights_stay_pruned_between_steps():
    seen: list[dict[str, torch.Tensor]] = []
    model = tiny("bert")

    def record(step, _):
        seen.append({n: (w != 0).clone() for n, w in _prunable(model).items()})

    finetune(model, _data(), config=_cfg(_gradual(every=1, end=0.75)), on_step=record)
    for before, after in zip(seen, seen[1:], strict=False):
        for name in before:
            assert not bool((after[name] & ~before[name]).any()), f"{name} regrew"


def test_a_pruned_start_continues_and_the_callers_masks_are_left_alone():
    model = tiny("bert")
    batches = [{"input_ids": torch.randint(3, VOCAB, (8, 8)), "attention_mask": torch.ones(8, 8, dtype=torch.long)}]
    result = hf_px.prune(model, batches, hf_px.PruneConfig(method="magnitude", sparsity=0.5, rounds=1),
                         progress=False)
    given = {n: m.clone() for n, m in result.masks.items()}
    out = finetune(result, _data(), config=_cfg(_gradual(initial_sparsity=0.5)), calibration=batches)
    for name, mask in result.masks.items():
        assert torch.equal(mask, given[name])
        now = _prunable(out.model)[name] != 0
        assert not bool((now & ~mask).any())  # what the one-shot step pruned is still pruned
    assert out.sparsity["density_before"] == pytest.approx(0.5, abs=1e-3)
    assert out.sparsity["density_after"] == pytest.approx(0.2, abs=1e-3)


class _Killed(Exception):
    pass


def test_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path):
    cfg = dict(epochs=3)
    ref = finetune(tiny("bert"), _data(), config=_cfg(_gradual(end=0.6), **cfg))

    def kill(step, _):
        if step == 7:
            raise _Killed

    with pytest.raises(_Killed):
        finetune(tiny("bert"), _data(), config=_cfg(_gradual(end=0.6), output_dir=str(tmp_path), save_every=5, **cfg),
                 on_step=kill)
    resumed = finetune(tiny("bert"), _data(), config=_cfg(_gradual(end=0.6), output_dir=str(tmp_path),
                                                          save_every=5, resume=True, **cfg))
    assert resumed.resumed_from is not None and resumed.global_step == ref.global_step == 18
    assert [e["step"] for e in resumed.extras["gradual"]] == [e["step"] for e in ref.extras["gradual"]]
    ref_params = dict(ref.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-5)


def test_lora_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="one-shot"):
        finetune(tiny("bert"), _data(), config=_cfg(_gradual(), peft="lora"))
