"""Timing two ways of computing the same thing, fairly, on a machine that may be busy.

Every kernel decision in :mod:`hf_px.inference` goes through one function with the :data:`Timer` signature, so a
test can inject a fake one and force any decision without measuring anything.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

#: ``timer(fns, repeats, layer) -> {key: milliseconds}``: ``fns`` maps ``"dense"`` and ``"sparse"`` to
#: zero-argument callables; ``layer`` is the layer's name, or ``None`` when ``fns`` run the whole model.
Timer = Callable[[Mapping[str, Callable[[], object]], int, str | None], Mapping[str, float]]


def interleaved_median_ms(fns: Mapping[str, Callable[[], object]], repeats: int, layer: str | None = None
                          ) -> dict[str, float]:
    """Median wall time of each callable in milliseconds, the callables run in turn.

    Each is called once to warm up (first calls allocate), then ``repeats`` rounds run every callable once, in
    alternating order, so load that drifts during the measurement hits all of them alike and none always runs
    right after another. The median ignores the odd round a background process steals.

    Example:
        >>> t = interleaved_median_ms({"dense": lambda: sum(range(1000)), "sparse": lambda: None}, repeats=3)
        >>> sorted(t), t["sparse"] < t["dense"]
        (['dense', 'sparse'], True)
    """
    del layer  # the real timer treats every comparison alike; a fake one may not
    keys = list(fns)
    for key in keys:
        fns[key]()
    times: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys if r % 2 == 0 else reversed(keys):
            t0 = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t0)
    return {key: 1e3 * statistics.median(v) for key, v in times.items()}
