"""Typed per-method options: PruneConfig(options=...), the scorers built with them, and prune.options in a run config."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny, tiny_batches

import hf_px
from hf_px.pipeline import ConfigError
from hf_px.pipeline.config import RunConfig, all_keys, apply_overrides
from hf_px.pruning.scoring import SCORERS, GraspOptions, Options, PXOptions, WandaOptions, get_scorer

MODEL = {"name_or_path": "builtin:minilm"}


def test_a_dict_becomes_the_methods_options_class():
    assert hf_px.PruneConfig(method="wanda", options={"per_row": False}).options == WandaOptions(per_row=False)
    assert hf_px.PruneConfig(method="px").options == PXOptions()
    assert type(hf_px.PruneConfig(method="snip").options) is Options
    cfg = hf_px.PruneConfig(method="synflow", options={"input_shape": [3, 8, 8]})
    assert cfg.options.input_shape == (3, 8, 8)
    assert cfg.to_dict()["options"] == {"input_shape": (3, 8, 8), "length": None}


@pytest.mark.parametrize(("method", "options", "message"), [
    ("wanda", {"per_rows": False}, "unknown wanda option 'per_rows'; valid: per_row"),
    ("snip", {"temperature": 2.0}, "unknown snip option 'temperature'; valid: none"),
    ("px", {"b_length": 0}, "b_length must be an integer >= 1"),
    ("px", {"qk_score": "qk"}, "qk_score must be one of 'ntk_diag', 'magnitude'"),
    ("grasp", {"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ("wanda", PXOptions(), "wanda takes WandaOptions options, got PXOptions"),
    ("snip", WandaOptions(), "snip takes Options options, got WandaOptions"),
    ("px", [("a_gate", "bound")], "must be a PXOptions or a dict"),
])
def test_bad_options_are_refused_naming_what_is_valid(method, options, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(")):
        hf_px.PruneConfig(method=method, options=options)


def test_every_registered_method_declares_an_options_class():
    for method, cls in SCORERS.items():
        assert issubclass(cls.options_class, Options), method
        assert isinstance(get_scorer(method).options, cls.options_class)


def test_the_scorer_reads_its_own_options_not_the_context():
    model = tiny("bert")
    batches = tiny_batches(model)
    per_row = hf_px.prune(model, batches, hf_px.PruneConfig(method="wanda", sparsity=0.5, rounds=1,
                                                           min_density_ratio=0.0), progress=False)
    glob = hf_px.prune(tiny("bert"), batches, hf_px.PruneConfig(method="wanda", sparsity=0.5, rounds=1,
                                                               min_density_ratio=0.0, options=WandaOptions(False)),
                       progress=False)
    assert any(not torch.equal(per_row.masks[k], glob.masks[k]) for k in per_row.masks)
    assert glob.report["config"]["options"] == {"per_row": False}
    assert get_scorer("grasp", {"temperature": 3.0}).options == GraspOptions(temperature=3.0)


def test_run_config_prune_options_are_validated_per_method():
    cfg = RunConfig.from_dict({"model": MODEL, "prune": {"method": "px", "options": {"a_gate": "bound"}}})
    assert cfg.prune.options.a_gate == "bound"
    assert cfg.to_dict()["prune"]["options"]["head_modules"] == []  # plain YAML types
    for prune, message in [
        ({"method": "wanda", "options": {"a_gate": "bound"}}, "unknown key prune.options.a_gate for method wanda. "
                                                              "Valid keys: per_row."),
        ({"options": {"a_gat": "bound"}}, "Did you mean 'a_gate'?"),
        ({"options": {"b_length": "long"}}, "prune.options.b_length: b_length must be an integer"),
        ({"method": "random", "options": {"seed": 1}}, "random. It takes no options."),
        ({"options": [1]}, "prune.options must be a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            RunConfig.from_dict({"model": MODEL, "prune": prune})


def test_option_keys_are_config_keys_and_overrides_merge_into_the_file():
    keys = set(all_keys())
    assert {"prune.options.qk_score", "prune.options.a_gate", "prune.options.b_length", "prune.options.per_row",
            "prune.options.temperature", "prune.options.input_shape", "prune.options.length"} <= keys
    assert not {"prune.qk_score", "prune.a_gate", "prune.b_length", "prune.extra"} & keys
    raw = apply_overrides({"model": MODEL, "prune": {"options": {"a_gate": "bound"}}},
                          {"prune.options.b_length": 1, "prune.sparsity": 0.5})
    assert raw["prune"] == {"options": {"a_gate": "bound", "b_length": 1}, "sparsity": 0.5}
    assert RunConfig.from_dict(raw).prune.options == PXOptions(a_gate="bound", b_length=1)
