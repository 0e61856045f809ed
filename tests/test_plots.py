"""The report's plots: titles, readable text, the floor line, the heat map at scale, markers, plain-word labels."""

from __future__ import annotations

import math
import random

import pytest

from hf_px.pipeline import plots
from hf_px.pipeline.summary import render_markdown

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROLES = ("q", "k", "v", "o", "ffn_gate", "ffn_in", "ffn_out")


def _layers(blocks: int, roles=ROLES, floor_blocks: int = 0) -> list[dict]:
    rng = random.Random(0)
    out = []
    for b in range(blocks):
        for r in roles:
            d = 0.02 if b >= blocks - floor_blocks and r.startswith("ffn") else rng.uniform(0.1, 0.4)
            out.append({"name": f"model.layers.{b}.{r}.weight", "numel": 4096, "density": d, "block": b, "role": r})
    return out


def report_data(blocks: int = 2, steps: int = 20, pcn_layers: int = 2, undersampled: bool = False) -> dict:
    history = [{"step": s, "loss": 1.0 / s} for s in range(1, steps + 1)]
    history += [{"step": s, "event": "eval", "eval_loss": 0.7, "eval_accuracy": 0.6 + 0.3 * s / steps}
                for s in range(5, steps + 1, 5)]
    return {
        "config": {"prune": {"min_density_ratio": 0.1}},
        "stages": {"save": {"folder": "07-save", "elapsed_s": 0.1}},
        "prune": {"method": "px", "target_sparsity": 0.8, "achieved_sparsity": 0.8, "rounds": 5,
                  "prunable_params": 12288, "kept_params": 2458, "time_s": 1.0, "layers": _layers(blocks)},
        "pcn": {"config": {"mode": "structured", "variance": None}, "calibration_tokens": 469,
                "undersampled": undersampled, "flops_before": 34944, "flops_after": 26752,
                "params_before": 999138, "params_after": 994978,
                "layers": [{"layer": i, "kind": "ffn", "width_before": 64, "width_after": 32,
                            "explained_variance": 0.9966, "components": 32} for i in range(pcn_layers)]},
        "finetune": {"history": history, "steps": steps, "world_size": 1, "metrics": {}},
        "eval_labels": {"counts": {"0": 57, "1": 43}, "majority": "0", "majority_accuracy": 0.57},
        "size": {"before": {"params": 999138, "nonzero_params": 999138, "flops_per_token": 34944,
                            "file_bytes": 3996552},
                 "after": {"params": 994978, "nonzero_params": 985044, "flops_per_token": 7092,
                           "file_bytes": 3984376}},
    }


def _texts(fig) -> list:
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip()]


def _check_readable(fig) -> None:
    """Every axes has a title and labelled axes, no text under 8 pt, and no text outside the figure."""
    fig.canvas.draw()
    for t in _texts(fig):
        assert t.get_fontsize() >= 8, t.get_text()
    drawn, page = fig.get_tightbbox(fig.canvas.get_renderer()), fig.bbox_inches  # what is drawn, in inches
    assert drawn.x0 >= page.x0 - 0.01 and drawn.y0 >= page.y0 - 0.01, "clipped at the left or bottom"
    assert drawn.x1 <= page.x1 + 0.01 and drawn.y1 <= page.y1 + 0.01, "clipped at the right or top"
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_title(), "untitled axes"
        assert ax.get_xlabel() or ax.get_shared_x_axes().get_siblings(ax) != [ax]
        # the size chart's rows are named by their tick labels (words, checked in its own test)
        assert ax.get_ylabel() or ax.get_title().startswith("Size")
        assert "_" not in ax.get_xlabel() and "_" not in ax.get_ylabel()  # words, not snake_case


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_every_plot_is_drawn_titled_readable_and_captioned(tmp_path):
    data = report_data()
    made = plots.draw_plots(data, tmp_path)
    assert set(made) == {"density", "pcn_variance", "curves", "sizes"}
    for name, file in made.items():
        assert (tmp_path / file).stat().st_size > 5000
        assert len(plots.caption(name, data)) > 40
    with plt.rc_context(plots.FONT):
        for name in made:
            _check_readable(plots.DRAW[name](plt, data))
    md = render_markdown(data, made, "plots/")
    for name in made:  # the caption line follows its image
        image = f"![{plots.PLOTS[name]}](plots/{name}.png)"
        assert f"{image}\n\n*{plots.caption(name, data)}*" in md


def test_density_has_the_target_and_the_floor_line():
    data = report_data()
    fig = plots._density(plt, data)
    xs = {round(line.get_xdata()[0], 4) for line in fig.axes[0].get_lines()}
    assert {0.2, 0.02} <= xs  # target density 1 - 0.8, floor 0.1 x 0.2
    assert plots.density_lines(data) == (pytest.approx(0.2), pytest.approx(0.02))
    assert "dotted line: the layer-collapse floor 0.020" in plots.caption("density", data)


def test_density_is_a_heat_map_of_blocks_by_roles_at_llama_scale():
    data = report_data(blocks=32)
    data["prune"]["layers"] = _layers(32, floor_blocks=3)
    fig = plots._density(plt, data)
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.shape == (32, len(ROLES))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(ROLES)
    bar = fig.axes[1]  # the colour bar carries the target and the floor
    assert {round(line.get_ydata()[0], 4) for line in bar.get_lines()} == {0.2, 0.02}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("floor" in t for t in legend) and "matrix at the floor" in legend
    assert len(ax.collections[0].get_offsets()) == 3 * 3  # ffn_gate/in/out of the last three blocks
    with plt.rc_context(plots.FONT):
        _check_readable(plots._density(plt, data))
    assert "rows are blocks" in plots.caption("density", data) and "Red crosses" in plots.caption("density", data)


def test_pcn_variance_and_width_are_two_labelled_panels():
    fig = plots._pcn(plt, report_data(undersampled=True))
    top, bottom = fig.axes
    assert "explained variance" in top.get_ylabel() and "width" in bottom.get_ylabel()
    assert top.get_ylim()[1] <= 1.05 and bottom.get_ylim()[1] > 64  # widths are not squeezed onto a 0-1 axis
    assert any("by construction" in t.get_text() for t in top.texts)  # the undersampled warning is on the plot
    assert "by construction" in plots.caption("pcn_variance", report_data(undersampled=True))


def test_curves_show_a_single_point_and_the_majority_class_line():
    data = report_data()
    data["finetune"]["history"] = [{"step": 1, "loss": 0.7},
                                   {"step": 1, "event": "eval", "eval_loss": 0.69, "eval_accuracy": 0.55}]
    fig = plots._curves(plt, data)
    left, right = fig.axes
    assert all(line.get_marker() not in (None, "None", "") for line in left.get_lines())
    dashed = [line for line in right.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(0.57)
    lo, hi = right.get_ylim()
    assert lo < 0.55 < hi and lo < 0.57 < hi
    assert "most frequent evaluation label (0.570)" in plots.caption("curves", data)
    data.pop("eval_labels")  # unknown label distribution (causal LM): no line
    assert not [x for x in plots._curves(plt, data).axes[1].get_lines() if x.get_linestyle() == "--"]


def test_long_curves_drop_markers_and_perplexity_gets_its_own_scale():
    data = report_data(steps=400)
    data["finetune"]["history"] += [{"step": s, "event": "eval", "eval_perplexity": math.exp(5 - s / 200)}
                                    for s in range(100, 401, 100)]
    fig = plots._curves(plt, data)
    assert fig.axes[0].get_lines()[0].get_marker() in (None, "None", "")
    assert fig.axes[1].get_yscale() == "log"  # accuracy beside perplexity spans orders of magnitude


def test_sizes_labels_are_words_and_do_not_overlap():
    fig = plots._sizes(plt, report_data())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == \
        ["parameters", "non-zero parameters", "matmul FLOPs per token", "weight file size"]
    assert ax.get_legend() is None and not fig.legends  # the before line is explained in the axis label
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    right = ax.get_window_extent().x1
    assert all(b.x1 <= right for b in boxes)  # the value labels stay inside the axes


def test_report_explains_why_nonzero_parameters_drop_little():
    data = report_data()
    md = render_markdown(data, {}, "plots/")
    assert "12,288 of the model's 994,978 parameters (1.2%)" in md
    assert "80.0% sparsity zeroes 9,830 weights, 1.0% of all parameters" in md
    assert "| non-zero parameters | 999,138 | 985,044 |" in md  # rows in words
    assert "(the size table's definition): 34,944 -> 26,752" in md  # one FLOP count for PCN and the size table


def test_no_matplotlib_no_plots(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    assert plots.draw_plots(report_data(), tmp_path / "none") == {}
