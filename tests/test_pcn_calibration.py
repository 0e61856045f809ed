"""PCN's calibration size: the warning and flag when tokens are fewer than the components kept, the pipeline's own
PCN sample, and the one FLOP count PCN and the run report share."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_px.pcn import FLOPS_DEFINITION, PCNConfig, apply_pcn, linear_flops, measured_width
from hf_px.pipeline.summary import model_stats

VOCAB = 100


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=VOCAB, num_labels=2)).eval()


def batches(n: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)} for _ in range(n)]


def _pcn_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if "calibration tokens" in str(w.message)]


def test_fewer_tokens_than_components_warns_and_is_flagged():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = apply_pcn(tiny_bert(), batches(1, 2, 8), PCNConfig(width=32))  # 16 tokens, 32 neurons kept
    assert report.calibration_tokens == 16 and report.undersampled
    assert report.undersampled_layers() == [0, 1]
    (message,) = _pcn_warnings(record)
    assert "16 calibration tokens but keeps up to 32 components" in message
    assert "at least 2 x 64 = 128 tokens" in message  # the fix: a sample sized to the measured width
    assert report.to_dict()["undersampled"] is True
    assert "fewer than the components kept" in str(report)


def test_enough_tokens_is_quiet():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = apply_pcn(tiny_bert(), batches(4, 4, 16), PCNConfig(width=32))  # 256 tokens
    assert not report.undersampled and not _pcn_warnings(record)
    assert report.to_dict()["undersampled"] is False


def test_calibration_factor_is_validated():
    assert PCNConfig().calibration_factor == 2.0 and PCNConfig().to_dict()["calibration_factor"] == 2.0
    assert PCNConfig(calibration_factor=0).calibration_factor == 0.0
    for bad in (-1, True, "2", float("nan"), 1e6):
        with pytest.raises(ValueError, match="calibration_factor"):
            PCNConfig(calibration_factor=bad)


def test_measured_width_reads_shapes_only():
    with torch.device("meta"):
        bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=96, vocab_size=VOCAB))
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB))
    assert measured_width(bert, PCNConfig()) == 96
    assert measured_width(bert, PCNConfig(mode="projection", width=0.5)) == 32
    assert measured_width(gpt2, PCNConfig()) == 4 * 32  # GPT-2's Conv1D FFN


def test_pcn_and_the_size_table_count_flops_the_same_way():
    model = tiny_bert()
    before = model_stats(model)
    assert before["dense_flops_per_token"] == before["flops_per_token"] == linear_flops(model)
    # every Linear: 2 blocks x (4 x 32x32 + 2 x 32x64), the pooler 32x32 and the head 32x2
    assert linear_flops(model) == 2 * (2 * (4 * 32 * 32 + 2 * 32 * 64) + 32 * 32 + 32 * 2)
    report = apply_pcn(model, batches(4, 4, 16), PCNConfig(width=32))
    assert report.flops_before == before["dense_flops_per_token"]
    assert report.flops_after == model_stats(model)["dense_flops_per_token"]
    assert report.to_dict()["flops_definition"] == FLOPS_DEFINITION
    with torch.no_grad():
        model.classifier.weight.zero_()
    assert linear_flops(model, nonzero=True) == report.flops_after - 2 * 32 * 2 == model_stats(model)["flops_per_token"]


@pytest.mark.slow  # the tokenizer comes from the packaged MiniLM
def test_the_pipeline_draws_pcn_a_sample_sized_to_the_width(tmp_path):
    from test_run import tiny_config

    import hf_px

    out = tmp_path / "run"
    # 2 examples per class for pruning: about 80 tokens, fewer than 2 x the FFN width of 64
    cfg = tiny_config(out, prune=None, finetune=None, evaluate={"enabled": False}, report={"plots": False})
    cfg["data"]["per_class"] = 2
    result = hf_px.run(cfg, progress=False)
    assert result.stages["pcn"] == "ran"
    calibrate = json.loads((out / "01-calibrate" / "manifest.json").read_text())["summary"]
    assert calibrate["num_examples"] == 4
    pcn = json.loads((out / "02-pcn" / "pcn.json").read_text())
    assert pcn["calibration"]["sample"] == "drawn for PCN" and pcn["calibration"]["tokens_wanted"] == 128
    assert pcn["calibration_tokens"] >= 128 and pcn["calibration"]["examples"] > 4
    assert pcn["undersampled"] is False
    assert "examples drawn for PCN" in (out / "report.md").read_text()
    # calibration_factor 0: PCN takes the pruning sample as before
    again = hf_px.run(cfg, progress=False, overrides={"pcn.calibration_factor": 0})
    assert again.stages["calibrate"] == "skipped" and again.stages["pcn"] == "ran"
    pcn = json.loads((out / "02-pcn" / "pcn.json").read_text())
    assert pcn["calibration"]["sample"] == "pruning calibration batches" and pcn["calibration_tokens"] < 128
