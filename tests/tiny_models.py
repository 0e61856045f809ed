"""Tiny random models of every registered family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 97


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=3, **overrides)
        model = BertForSequenceClassification(cfg)
    elif family == "roberta":
        cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=70, num_labels=2, pad_token_id=1, **overrides)
        model = RobertaForSequenceClassification(cfg)
    elif family == "distilbert":
        cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               max_position_embeddings=64, num_labels=2, **overrides)
        model = DistilBertForSequenceClassification(cfg)
    elif family in ("gpt2", "gpt2-cls"):
        kwargs = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, num_labels=2)
        cfg = GPT2Config(**{**kwargs, **overrides})
        model = GPT2LMHeadModel(cfg) if family == "gpt2" else GPT2ForSequenceClassification(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0, **overrides)
        model = LlamaForCausalLM(cfg)
    elif family == "vit":
        cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=4, **overrides)
        model = ViTForImageClassification(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def tiny_batches(model: torch.nn.Module, n_batches: int = 2, batch: int = 4, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    out = []
    for i in range(n_batches):
        if cfg.model_type == "vit":
            out.append({"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g),
                        "labels": torch.arange(batch) % cfg.num_labels})
            continue
        ids = torch.randint(3, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if i == 0:  # one right-padded row
            pad = getattr(cfg, "pad_token_id", 0) or 0
            ids[0, length - 3:] = pad
            mask[0, length - 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch) % 2})
    return out


def save_tiny_checkpoint(folder):
    """A tiny random 2-label BERT with the packaged MiniLM's tokenizer, saved to ``folder`` like a Hub checkpoint."""
    from transformers import AutoTokenizer

    from hf_px.builtin import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=2)
                                  ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TOY_WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "was"]


def toy_word_tokenizer():
    """A word-level tokenizer over :data:`TOY_WORDS` (ids 2..11; 0 pad, 1 unknown), for the toy sentiment splits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(TOY_WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def toy_sentiment_split(n: int, seed: int):
    """``n`` labelled sentences whose label is written in them (a positive or a negative word): learnable."""
    import datasets

    texts, labels = [], []
    for i in range(n):
        label = (i * 7 + seed) % 2
        texts.append(f"the movie was {TOY_WORDS[(i % 3) + (0 if label else 3)]} {TOY_WORDS[6 + i % 4]}")
        labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (scripts/ is not a package; its siblings are importable meanwhile)."""
    import importlib.util
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(scripts))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(scripts))
    return module
