"""Fine-tuning with the masks held fixed: the Accelerate loop (:mod:`.loop`), its data, optimizer, checkpoints and
outputs, evaluation and the shipped offline metrics, distillation from a teacher, LoRA.

The public entry points are re-exported by :mod:`hf_px` (``hf_px.finetune``, ``hf_px.evaluate``, ...).
"""
