"""Distillation from a dense teacher while fine-tuning, the teacher-logit cache, and frozen embeddings."""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch
from tiny_models import VOCAB, tiny

import hf_px
from hf_px.finetuning.distill import DistillConfig, build_distiller, hidden_state_loss, kd_loss
from hf_px.finetuning.loop import FinetuneConfig, finetune
from hf_px.finetuning.optim import embedding_parameters
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.targets import collect_targets


def _pruned(family: str = "bert", seed: int = 0, density: float = 0.4, **overrides):
    model = tiny(family, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    masks = {t.param_name: torch.rand(t.param.shape, generator=g) < density for t in collect_targets(model)}
    apply_masks(model, masks)
    return model, masks


def _bert(seed: int, **config):
    """A tiny BERT of another shape than tiny('bert') (whose shape arguments cannot be overridden)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                                                    **{**shape, **config})).eval()


def _data(n: int = 32, length: int = 8, seed: int = 0, ragged: bool = False, labels: bool = True):
    """Token ids; ``ragged``: lengths from length/2 to length, so batches are padded differently every epoch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g).tolist()
    if ragged:
        ids = [row[: length // 2 + i % (length // 2 + 1)] for i, row in enumerate(ids)]
    cols = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}
    if labels:
        cols["label"] = [r[0] % 3 for r in ids]
    return datasets.Dataset.from_dict(cols)


def _cfg(teacher=None, **kwargs) -> FinetuneConfig:
    distill = kwargs.pop("distill", None)
    if teacher is not None:
        distill = DistillConfig(teacher=teacher, **(distill or {}))
    base = dict(epochs=2, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0, log_every=1, progress_bar=False)
    return FinetuneConfig(**{**base, **kwargs}, distill=distill)


def _assert_masks_hold(model, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@torch.no_grad()
def _kl_to_teacher(student, teacher, ds, temperature: float = 1.0) -> float:
    batch = {"input_ids": torch.tensor(ds["input_ids"]), "attention_mask": torch.tensor(ds["attention_mask"])}
    return float(kd_loss(student.eval()(**batch).logits, teacher.eval()(**batch).logits, temperature))


# ---------------------------------------------------------------------------------------------- the loss terms


def test_kd_term_equals_a_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, 4.0]]
    temperature = 2.0

    def softmax(row):
        e = [math.exp(x / temperature) for x in row]
        return [x / sum(e) for x in e]

    expected = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(tr), softmax(sr), strict=True))
                   for sr, tr in zip(s, t, strict=True)) / 2
    got = kd_loss(torch.tensor(s), torch.tensor(t), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert expected > 0.05  # a pair far enough apart that a wrong formula shows

    # token-level logits: padding positions (mask 0) do not count, whatever their values
    s3 = torch.tensor([s + [[9.0, -9.0, 0.0]]])
    t3 = torch.tensor([t + [[-9.0, 9.0, 0.0]]])
    masked = kd_loss(s3, t3, temperature, mask=torch.tensor([[1, 1, 0]]))
    assert float(masked) == pytest.approx(expected, rel=1e-6)


def test_loss_combines_ce_kd_and_hidden_terms_as_documented():
    student, teacher = tiny("bert", seed=0), tiny("bert", seed=1)
    cfg = DistillConfig(teacher=teacher, temperature=3.0, alpha=0.3, hidden_weight=0.7, hidden_loss="cosine")
    distiller = build_distiller(cfg, student)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "labels": torch.tensor([0, 2])}
    loss = distiller.loss(student, batch)
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True)
        t = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    kd = torch.nn.functional.kl_div(torch.log_softmax(s.logits / 3, -1), torch.log_softmax(t.logits / 3, -1),
                                    reduction="batchmean", log_target=True)
    real = batch["attention_mask"].bool()
    hidden = torch.stack([(1 - torch.cosine_similarity(a, b, dim=-1))[real].mean()
                          for a, b in zip(s.hidden_states[1:], t.hidden_states[1:], strict=True)]).mean()
    expected = 0.7 * s.loss + 0.3 * 9 * kd + 0.7 * hidden
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    means = distiller.logged_means()
    assert set(means) == {"loss_ce", "loss_kd", "loss_hidden"}
    assert means["loss_hidden"] == pytest.approx(float(hidden), rel=1e-5)


def test_hidden_loss_ignores_padding_and_names_a_depth_mismatch():
    a = [torch.zeros(1, 3, 4), torch.ones(1, 3, 4)]
    b = [torch.zeros(1, 3, 4), torch.ones(1, 3, 4)]
    b[1][0, 2] = 100.0  # only at the padded position
    mask = torch.tensor([[1, 1, 0]])
    assert float(hidden_state_loss(a, b, mask, "mse")) == 0.0
    assert float(hidden_state_loss(a, b, None, "mse")) > 1000
    with pytest.raises(ValueError, match="2 blocks of width 4 and the teacher 1 blocks"):
        hidden_state_loss(a + [torch.ones(1, 3, 4)], b, mask)

    student, _ = _pruned()
    deeper = _bert(1, num_hidden_layers=3)
    with pytest.raises(ValueError, match="give hidden_layers"):
        finetune(student, _data(), config=_cfg(deeper, distill={"hidden_weight": 1.0}))
    wider = _bert(1, hidden_size=64)
    with pytest.raises(ValueError, match="width 32 and the teacher 2 blocks of width 64"):
        finetune(student, _data(), config=_cfg(wider, distill={"hidden_weight": 1.0}))


def test_hidden_layers_pair_each_student_block_with_the_named_teacher_block():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]  # embeddings + 2 blocks
    teacher = [torch.randn(2, 3, 4, generator=g) for _ in range(5)]  # embeddings + 4 blocks
    got = hidden_state_loss(student, teacher, None, "mse", layers=[1, 3])
    want = ((student[1] - teacher[2]).pow(2).mean() + (student[2] - teacher[4]).pow(2).mean()) / 2
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="one teacher block"):
        hidden_state_loss(student, teacher, None, "mse", layers=[1, 4])  # no teacher block 4
    with pytest.raises(ValueError, match="one teacher block"):
        hidden_state_loss(student, teacher, None, "mse", layers=[0, 1, 2])  # three pairs for two blocks
    for bad in ([2, 1], [0, 0], [-1, 2], [], "0,2", [0.0, 1]):
        with pytest.raises(ValueError, match="hidden_layers"):
            DistillConfig(teacher="t", hidden_weight=1.0, hidden_layers=bad)

    # a student two blocks shallower than its teacher trains with the pairing, and is refused without it
    student_model, _ = _pruned()
    deeper = _bert(1, num_hidden_layers=4)
    with pytest.raises(ValueError, match="give hidden_layers"):
        finetune(student_model, _data(), config=_cfg(deeper, distill={"hidden_weight": 1.0}))
    out = finetune(student_model, _data(), config=_cfg(deeper, distill={"hidden_weight": 1.0,
                                                                         "hidden_layers": [0, 3]}))
    hidden = [h["loss_hidden"] for h in out.history if "loss_hidden" in h]
    assert out.global_step > 0 and hidden and all(math.isfinite(v) and v > 0 for v in hidden)


# ---------------------------------------------------------------------------------------------- training


def test_alpha_zero_reproduces_the_plain_run_exactly():
    data = _data(ragged=True)
    # dropout on: the teacher pass must not draw from the RNG stream of the student's dropout
    plain = finetune(_pruned(hidden_dropout_prob=0.1)[0], data, config=_cfg())
    teacher = tiny("bert", seed=1)
    calls = _count_calls(teacher)
    distilled = finetune(_pruned(hidden_dropout_prob=0.1)[0], data,
                         config=_cfg(teacher, distill={"alpha": 0.0, "temperature": 3.0}))
    assert calls[0] == 8  # the teacher did run (2 epochs x 4 batches)
    ref = dict(plain.model.named_parameters())
    for name, p in distilled.model.named_parameters():
        assert torch.equal(p, ref[name]), name
    assert [h["loss"] for h in distilled.history] == [h["loss"] for h in plain.history]
    assert all(h["loss_ce"] == h["loss"] and h["loss_kd"] > 0 for h in distilled.history)


def test_alpha_one_pulls_the_student_toward_the_teacher_and_the_teacher_stays_frozen():
    data = _data(labels=False)  # alpha=1 needs no labels
    student, masks = _pruned()
    teacher = tiny("bert", seed=1).train()  # with dropout active, as a user might pass it
    with torch.no_grad():  # random tiny models predict almost uniformly: give the teacher confident targets
        teacher.classifier.weight.mul_(200)
    before = _snapshot(teacher)
    kl_before = _kl_to_teacher(copy.deepcopy(student), teacher, data)
    out = finetune(student, data, config=_cfg(teacher, epochs=4, learning_rate=1e-2,
                                              distill={"alpha": 1.0, "temperature": 1.0}))
    kl_after = _kl_to_teacher(out.model, teacher, data)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    kd = [h["loss_kd"] for h in out.history]
    assert kd[-1] < kd[0] and "loss_ce" not in out.history[0]
    _assert_masks_hold(out.model, masks)
    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]), name
        assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_cached_and_uncached_teacher_logits_train_the_same_weights(family):
    data = _data(ragged=True, labels=family == "bert")  # ragged: a cached row must fit other paddings
    teacher = tiny(family, seed=1)
    calls = _count_calls(teacher)
    runs = {}
    for cache in (False, True):
        calls[0] = 0
        student, masks = _pruned(family)
        out = finetune(student, data, config=_cfg(teacher, distill={"alpha": 0.7, "cache_logits": cache}))
        _assert_masks_hold(out.model, masks)
        runs[cache] = (out, calls[0])
    assert runs[False][1] == 8 and runs[True][1] == 4  # 4 batches per epoch; epoch 2 reads the cache only
    ref = dict(runs[False][0].model.named_parameters())
    for name, p in runs[True][0].model.named_parameters():
        torch.testing.assert_close(p, ref[name], atol=1e-6, rtol=1e-5)


def test_hidden_matching_with_weight_decay_keeps_masks_and_logs_the_term():
    student, masks = _pruned(density=0.3)
    out = finetune(student, _data(ragged=True), config=_cfg(tiny("bert", seed=1), weight_decay=0.5,
                                                            distill={"hidden_weight": 1.0, "hidden_loss": "mse"}))
    _assert_masks_hold(out.model, masks)
    assert out.sparsity["nonzero_after"] == out.sparsity["kept_before"]
    hidden = [h["loss_hidden"] for h in out.history]
    assert hidden[-1] < hidden[0]


def test_distillation_with_lora_keeps_masks_and_a_checkpoint_teacher(tmp_path):
    teacher = tiny("bert", seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    data = _data()
    runs = []
    for source in (teacher, str(tmp_path / "teacher")):  # in memory, or loaded with hf_px.load
        student, masks = _pruned()
        out = finetune(student, data, config=_cfg(source, peft="lora", lora_r=4, learning_rate=1e-2))
        assert type(out.model).__name__ == "BertForSequenceClassification"  # merged
        _assert_masks_hold(out.model, masks)
        assert {"loss_ce", "loss_kd"} <= set(out.history[-1])
        runs.append(out.model)
    ref = dict(runs[0].named_parameters())
    for name, p in runs[1].named_parameters():
        torch.testing.assert_close(p, ref[name])


class _Killed(Exception):
    pass


def test_resume_with_a_cache_matches_an_uninterrupted_run(tmp_path):
    data, teacher = _data(), tiny("bert", seed=1)
    cfg = dict(epochs=3, distill={"cache_logits": True})
    ref = finetune(_pruned()[0], data, config=_cfg(teacher, **cfg))

    def kill(step, record):
        if step == 6:
            raise _Killed

    with pytest.raises(_Killed):
        finetune(_pruned()[0], data, config=_cfg(teacher, output_dir=str(tmp_path), save_every=5, **cfg),
                 on_step=kill)
    resumed = finetune(_pruned()[0], data, config=_cfg(teacher, output_dir=str(tmp_path), save_every=5,
                                                        resume=True, **cfg))
    assert resumed.resumed_from is not None and resumed.global_step == ref.global_step == 12
    ref_params = dict(ref.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- frozen embeddings


def test_freeze_embeddings_keeps_them_bit_identical_and_out_of_the_optimizer(monkeypatch):
    optimizers = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    student, masks = _pruned()
    emb = {id(p) for p in embedding_parameters(student)}
    names = [n for n, p in student.named_parameters() if id(p) in emb]
    assert len(names) == 3  # word, position and token-type tables
    before = _snapshot(student)
    out = finetune(student, _data(), config=_cfg(freeze_embeddings=True, weight_decay=0.5))
    params = dict(out.model.named_parameters())
    for name in names:
        assert torch.equal(params[name], before[name]), name
    assert any(not torch.equal(params[n], before[n]) for n in masks)  # the rest did train
    (optimizer,) = optimizers
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & emb
    assert not {id(p) for p in optimizer.state} & emb
    _assert_masks_hold(out.model, masks)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, match", [
    ({"teacher": 3}, "teacher"),
    ({"teacher": ""}, "teacher"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": True}, "alpha"),
    ({"hidden_weight": -1}, "hidden_weight"),
    ({"hidden_loss": "l1"}, "hidden_loss"),
    ({"cache_logits": "yes"}, "cache_logits"),
    ({"cache_logits": True, "hidden_weight": 1.0}, "hidden states"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**{"teacher": "out/dense", **kwargs})


def test_a_teacher_left_unset_is_refused_when_training_starts():
    cfg = FinetuneConfig(max_steps=1, progress_bar=False, distill=DistillConfig(teacher=None))
    with pytest.raises(ValueError, match="teacher is None"):
        hf_px.finetune(tiny("bert"), _data(), config=cfg)


def test_config_round_trips_through_to_dict_and_rejects_a_shared_teacher():
    assert hf_px.DistillConfig is DistillConfig
    teacher = tiny("bert", seed=1)
    cfg = _cfg(teacher, distill={"alpha": 0.25})
    d = cfg.to_dict()
    assert d["distill"] == {"teacher": "BertForSequenceClassification", "temperature": 2.0, "alpha": 0.25,
                            "hidden_weight": 0.0, "hidden_loss": "mse", "hidden_layers": None, "cache_logits": False}
    assert cfg.distill.teacher is teacher  # to_dict did not deep-copy the module away
    restored = build_distiller({**d["distill"], "teacher": teacher}, tiny("bert"))
    assert restored.config.alpha == 0.25
    student = tiny("bert")
    with pytest.raises(ValueError, match="shares parameters"):
        build_distiller(DistillConfig(teacher=student), student)
    with pytest.raises(TypeError, match="DistillConfig"):
        build_distiller(0.5, student)
