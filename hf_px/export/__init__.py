"""Export: save and load checkpoints (:mod:`.serialization`, dense or the sparse format of :mod:`.sparse_format`),
checks of weight files before they are read, the model card, the Hub upload and CPU sparse inference.

The public entry points are re-exported by :mod:`hf_px` (``hf_px.save_pretrained``, ``hf_px.load``, ...).
"""
