"""Pruning: the iterative loop (:mod:`.loop`), its scorers (:mod:`.scoring`), targets, masks and global ranking,
the PX path surrogate (:mod:`.surrogate`) and the per-layer report (:mod:`.report`).

The public entry points are re-exported by :mod:`hf_px` (``hf_px.prune``, ``hf_px.PruneResult``, ...).
"""
