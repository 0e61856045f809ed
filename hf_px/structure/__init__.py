"""Structural removal that the stock transformers classes reload: whole blocks and attention heads.

Unstructured masks keep every shape; this package shrinks them. :func:`remove_blocks` deletes repeated blocks,
:func:`remove_heads` deletes attention heads (Llama family), each in place and with the config rewritten so that
``save_pretrained`` + stock ``AutoModel*.from_pretrained`` rebuild the same model. :func:`rank_blocks` and
:func:`rank_heads` order blocks and heads by a registered pruning score (least important first);
:func:`collapsed_blocks` lists the blocks whose residual writers are all zero (PX's layer collapse).

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_px.structure import remove_blocks
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=2, intermediate_size=32))
    >>> remove_blocks(model, [2])["layers_after"], model.config.num_hidden_layers
    (2, 2)
"""

from .blocks import collapsed_blocks, rank_blocks, remove_blocks
from .heads import rank_heads, remove_heads

__all__ = ["collapsed_blocks", "rank_blocks", "rank_heads", "remove_blocks", "remove_heads"]
