"""fedepic.plots: panel grids (at most 3 per row, legend outside the axes, ± s.e. bands), one style per
member, heatmaps, and the save helper (PNG at the stated dpi plus PDF or SVG, atomically)."""

from __future__ import annotations

import math

from pathlib import Path

import pytest
from PIL import Image

from fedepic import plots
from fedepic.outputs import RunWriter

MEMBERS = ["gossip", "median", "trimmed_mean", "scclip", "exclude", "gp", "gp_epic", "upper"]
PANELS = ("mean_accuracy", "worst_accuracy", "exclusive_accuracy", "consensus_distance", "detection_recall")


def member_series(offset: float, rounds: int = 8) -> dict[str, list[float]]:
    return {"mean_accuracy": [0.1 * offset + 0.05 * r for r in range(rounds)],
            "worst_accuracy": [0.05 * r for r in range(rounds)],
            "exclusive_accuracy": [offset / 10] * rounds,
            "consensus_distance": [1e-4 * (r + 1) for r in range(rounds)],
            "detection_recall": [float("nan")] * rounds}  # no detector: no line, the panel only if a member has one


def saved_png(tmp_path: Path, fig, stem: str = "f", dpi: int = 100, vector: str = "pdf") -> tuple[Path, list[str]]:
    with RunWriter(tmp_path, "figs") as writer:
        try:
            names = plots.save_figure(writer, fig, stem, dpi, vector)
        finally:
            plots.close(fig)
    return writer.path, names


def test_member_styles_are_distinct_and_follow_the_member_order():
    styles = plots.member_styles(MEMBERS)
    assert len(set(styles.values())) == len(MEMBERS)
    assert len({s.color for s in styles.values()}) == len(MEMBERS)  # eight members, eight colours
    assert plots.member_styles(MEMBERS) == styles  # the same run order, the same styles in every figure
    many = plots.member_styles([f"m{i}" for i in range(40)])
    assert len(set(many.values())) == 40


def test_panel_grid_has_at_most_three_panels_a_row_and_one_legend_outside_the_axes():
    per_member = {m: member_series(i) for i, m in enumerate(MEMBERS)}
    per_member["gp"]["detection_recall"] = [0.25 * min(r, 4) for r in range(8)]
    styles = plots.member_styles(MEMBERS)
    fig = plots.panel_grid_figure(per_member, PANELS, "round", "noniid: decentralized MNIST, seed 0", styles)
    try:
        drawn = [ax for ax in fig.axes if ax.get_lines()]
        assert len(drawn) == 5
        columns = {round(ax.get_position().x0, 3) for ax in drawn}
        assert len(columns) == 3  # 3 + 2 panels
        assert [ax.get_title() for ax in drawn][0] == "mean accuracy of benign nodes"
        assert drawn[0].get_ylabel() == "%"  # fractions drawn in percent
        assert list(drawn[0].get_lines()[1].get_ydata()) == pytest.approx([10 + 5 * r for r in range(8)])
        recall = next(ax for ax in drawn if ax.get_title() == "detection recall")
        assert len(recall.get_lines()) == 1  # only gp has a detector
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + fig.legends
        assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == MEMBERS
        assert all(ax.get_legend() is None for ax in drawn)  # never over the lines
        gp_line = drawn[0].get_lines()[MEMBERS.index("gp")]
        assert (gp_line.get_color(), gp_line.get_marker(), gp_line.get_linestyle()) == \
            (styles["gp"].color, styles["gp"].marker, styles["gp"].linestyle)
    finally:
        plots.close(fig)


def test_a_member_keeps_its_style_in_its_own_curves():
    styles = plots.member_styles(MEMBERS)
    fig = plots.curves_figure(member_series(1.0), "round", "gp", styles["gp"])
    try:
        line = fig.axes[0].get_lines()[0]
        assert line.get_color() == styles["gp"].color and line.get_linestyle() == styles["gp"].linestyle
        assert not fig.legends and all(ax.get_legend() is None for ax in fig.axes)
    finally:
        plots.close(fig)


def test_curves_take_their_x_values_from_the_at_x_series():
    """With train.eval_every > 1 the accuracies exist at some rounds only: they are drawn at those rounds."""
    series = {"mean_accuracy": [0.5, 0.7], "mean_accuracy@x": [10, 20], "train_loss": [1.0, 0.9, 0.8]}
    fig = plots.curves_figure(series, "round", "t")
    try:
        lines = [ax.get_lines()[0] for ax in fig.axes if ax.get_lines()]
        assert [list(line.get_xdata()) for line in lines] == [[10, 20], [1, 2, 3]]  # no panel for "@x"
    finally:
        plots.close(fig)
    fig = plots.panel_grid_figure({"gp": series}, ["mean_accuracy"], "round", "t")
    try:
        assert list(fig.axes[0].get_lines()[0].get_xdata()) == [10, 20]
    finally:
        plots.close(fig)


def test_a_standard_error_series_draws_a_band_around_the_mean():
    series = {"test_accuracy": [0.5, 0.6, 0.7], "test_accuracy@se": [0.01, 0.02, 0.0], "test_accuracy@x": [2, 4, 6]}
    fig = plots.panel_grid_figure({"epic-0.1": series, "none": {"test_accuracy": [0.4, 0.5, 0.6]}},
                                  ["test_accuracy"], "epoch", "t")
    try:
        ax = fig.axes[0]
        assert len(ax.collections) == 1  # one band: only the member with an s.e.
        band = ax.collections[0].get_paths()[0].vertices
        assert band[:, 1].min() == pytest.approx(49.0) and band[:, 1].max() == pytest.approx(70.0)
        assert band[:, 0].min() == 2 and band[:, 0].max() == 6
        legend = next(iter(fig.legends), None) or next(a.get_legend() for a in fig.axes if a.get_legend())
        assert legend.get_title().get_text() == "member (shaded: ± s.e.)"  # the reader is told what the band is
    finally:
        plots.close(fig)


def test_a_standard_error_of_one_trial_draws_no_band_and_promises_none():
    """n = 1: the s.e. is NaN (fedepic.metrics.mean_and_se), so no band, and the legend says no shading."""
    series = {"test_accuracy": [0.5, 0.6], "test_accuracy@se": [math.nan, math.nan]}
    fig = plots.panel_grid_figure({"none": series, "epic-0.1": {"test_accuracy": [0.4, 0.5]}}, ["test_accuracy"],
                                  "epoch", "t")
    try:
        assert len(fig.axes[0].collections) == 0
        legend = next(iter(fig.legends), None) or next(a.get_legend() for a in fig.axes if a.get_legend())
        assert legend.get_title().get_text() == "member"
    finally:
        plots.close(fig)


def inside(fig, artist) -> bool:
    box, frame = artist.get_window_extent(), fig.bbox
    return box.x0 >= frame.x0 - 1 and box.y0 >= frame.y0 - 1 and box.x1 <= frame.x1 + 1 and box.y1 <= frame.y1 + 1


@pytest.mark.filterwarnings("error")  # a legend too large for the figure collapses the layout: a warning
@pytest.mark.parametrize("panels", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("members", [1, 8, 17])
def test_panel_grids_stay_within_three_to_one_with_the_legend_inside(panels, members):
    names = [f"variant_{i}_with_a_long_name" for i in range(members)]
    series = {f"m{p}_accuracy": [0.1, 0.2, 0.3] for p in range(panels)}
    fig = plots.panel_grid_figure({m: series for m in names}, list(series), "round",
                                  "a long setting title: decentralized MNIST, 20 nodes (4 malicious), small_world "
                                  "(k=4, p=0.2), attack label_flip, seed 0")
    try:
        fig.canvas.draw()  # what save_figure writes: the figure's size times the dpi (no tight bbox)
        width, height = fig.get_size_inches()
        assert width / height <= 3.0
        legend = next(iter(fig.legends), None) or next(ax.get_legend() for ax in fig.axes if ax.get_legend())
        assert inside(fig, legend) and inside(fig, fig._suptitle)
        assert not legend.get_window_extent().overlaps(fig._suptitle.get_window_extent())
        assert all(inside(fig, ax) for ax in fig.axes)
    finally:
        plots.close(fig)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("rows, cols", [(2, 10), (8, 10), (10, 8), (10, 200), (17, 10), (200, 10)])
def test_heatmaps_draw_the_values_and_stay_within_three_to_one(rows, cols):
    values = [[(r * cols + c) % 101 for c in range(cols)] for r in range(rows)]
    values[0][0] = float("nan")  # a class without test rows: blank, not 0
    fig = plots.heatmap_figure(values, [f"member {r}" for r in range(rows)], [f"{c} (exclusive)" for c in range(cols)],
                               "Per-class test accuracy", "test accuracy (%)", row_title="member",
                               col_title="class", vmin=0, vmax=100)
    try:
        image = fig.axes[0].get_images()[0]
        assert image.get_array().shape == (rows, cols) and bool(image.get_array().mask[0, 0])
        assert image.get_clim() == (0, 100)
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert bool(texts) == (rows <= 17 and cols <= 10)  # small grids carry their values, in cells that fit
        assert f"{values[-1][-1]:.0f}" in texts or not texts
        assert fig.axes[-1].get_ylabel() == "test accuracy (%)"  # the colour bar
        fig.canvas.draw()
        width, height = fig.get_size_inches()
        assert width / height <= 3.0 and all(inside(fig, ax) for ax in fig.axes)
    finally:
        plots.close(fig)


def test_heatmap_grid_shares_one_colour_scale():
    panels = [plots.Heatmap([[0.0, 50.0], [100.0, 25.0]], ["0", "1"], ["1", "2"], name, "class", "round")
              for name in ("gossip", "gp", "upper", "exclude")]
    fig = plots.heatmap_grid_figure(panels, "t", "test accuracy (%)", vmin=0, vmax=100)
    try:
        images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
        assert len(images) == 4 and {im.get_clim() for im in images} == {(0, 100)}
        assert [ax.get_title() for ax in fig.axes if ax.get_images()] == ["gossip", "gp", "upper", "exclude"]
    finally:
        plots.close(fig)


@pytest.mark.parametrize("vector, magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_save_figure_writes_png_at_the_dpi_and_a_reproducible_vector_copy(tmp_path, vector, magic):
    def figure():
        return plots.panel_grid_figure({"a": {"accuracy": [0.1, 0.5]}}, ["accuracy"], "round", "t")

    fig = figure()
    size = fig.get_size_inches()
    folder, names = saved_png(tmp_path / "1", fig, dpi=200, vector=vector)
    assert names == ["f.png", f"f.{vector}"]
    png = Image.open(folder / "f.png")
    assert png.info["dpi"] == pytest.approx((200, 200), abs=0.01)
    assert png.size == (round(size[0] * 200), round(size[1] * 200))
    assert (folder / f"f.{vector}").read_bytes().startswith(magic)
    assert not list(folder.glob(".*.tmp"))  # written through temporary names
    again, _ = saved_png(tmp_path / "2", figure(), dpi=200, vector=vector)
    assert (again / f"f.{vector}").read_bytes() == (folder / f"f.{vector}").read_bytes()  # no dates inside
    with pytest.raises(ValueError, match="eps"):
        plots.save_figure(None, figure(), "f", 100, "eps")


def test_member_curves_list_constant_and_repeated_metrics_instead_of_drawing_them():
    """A flat curve (two points or more, all equal) or a copy of a curve drawn before it becomes a note
    under the panels: the values stay on the figure, as text."""
    series = {"mean_accuracy": [0.5, 0.6, 0.7], "clean_accuracy": [0.5, 0.6, 0.7], "attack_success": [0.0, 0.0, 0.0],
              "detection_precision": [1.0, 1.0, 1.0], "train_loss": [1.0, 0.5, 0.25],
              "worst_accuracy": [0.4], "exclusive_accuracy": [0.0, float("nan"), 0.0]}
    panels, notes = plots.curve_panels(series)
    assert panels == ["mean_accuracy", "train_loss", "worst_accuracy", "exclusive_accuracy"]  # one point; a gap
    assert notes == ["accuracy on labels the attack leaves alone: the same as mean accuracy of benign nodes",
                     "attack success: 0.0 % at every round", "detection precision: 100.0 % at every round"]
    fig = plots.curves_figure(series, "round", "gp")
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_lines()]
        assert titles == ["mean accuracy of benign nodes", "training loss", "worst benign node's accuracy",
                          "accuracy on labels only malicious\nnodes hold"]
        note = " ".join(fig._supxlabel.get_text().split())
        assert note == "Not drawn: " + "; ".join(notes) + "."
        fig.canvas.draw()
        assert inside(fig, fig._supxlabel) and not any(
            fig._supxlabel.get_window_extent().overlaps(ax.get_tightbbox()) for ax in fig.axes if ax.get_lines())
    finally:
        plots.close(fig)


def test_same_values_in_other_units_are_drawn_and_all_flat_curves_keep_their_panels():
    same_values = {"mean_accuracy": [0.5, 0.25], "train_loss": [0.5, 0.25]}  # percent and cross-entropy
    assert plots.curve_panels(same_values) == (["mean_accuracy", "train_loss"], [])
    shifted = {"mean_accuracy": [0.5, 0.25], "mean_accuracy@x": [1, 2], "worst_accuracy": [0.5, 0.25],
               "worst_accuracy@x": [2, 4]}
    assert plots.curve_panels(shifted)[0] == ["mean_accuracy", "worst_accuracy"]  # other rounds: its own curve
    flat = {"attack_success": [0.0, 0.0], "detection_precision": [1.0, 1.0]}
    assert plots.curve_panels(flat) == (["attack_success", "detection_precision"], [])  # nothing else to show
    fig = plots.curves_figure(flat, "round", "t")
    try:
        assert sum(1 for ax in fig.axes if ax.get_lines()) == 2 and fig._supxlabel is None
    finally:
        plots.close(fig)


def test_percent_titles_sit_on_the_axes_and_a_multiplier_lifts_the_others():
    """A percentage axis has no offset text: its title is placed at the top of the axes without the
    automatic placement; a consensus distance below 1e-3 gets "×10⁻⁴" (mathtext) and its title above it."""
    series = {"mean_accuracy": [0.5, 0.7], "consensus_distance": [1e-4, 3e-4], "train_loss": [1.0, 0.5]}
    fig = plots.curves_figure(series, "round", "t")
    try:
        fig.canvas.draw()
        by_title = {ax.get_title(): ax for ax in fig.axes if ax.get_lines()}
        accuracy, distance, loss = (by_title[t] for t in ("mean accuracy of benign nodes",
                                                          "consensus distance to the average\nmodel", "training loss"))
        assert accuracy._autotitlepos is False and accuracy.yaxis.offsetText.get_text() == ""
        offset = distance.yaxis.offsetText
        assert offset.get_text().startswith("$\\times\\mathdefault{10^{") and "4}}" in offset.get_text()
        assert distance.title.get_window_extent().y0 >= offset.get_window_extent().y1 - 0.5  # never over it
        assert distance.yaxis.get_major_formatter().get_useMathText()
        assert not loss.yaxis.get_major_formatter().get_useMathText()  # plain labels: no "×10ⁿ" at 0.5 to 1
        assert all("$" not in t.get_text() for t in loss.get_yticklabels())
        assert loss._autotitlepos is False and loss.yaxis.offsetText.get_text() == ""  # nothing to lift it over
        assert distance._autotitlepos is not False
    finally:
        plots.close(fig)
    fig = plots.curves_figure({"train_loss": [2.30210, 2.30250]}, "round", "t")  # an offset: "+2.302"
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax._autotitlepos is not False and ax.yaxis.offsetText.get_text()
        assert not ax.title.get_window_extent().overlaps(ax.yaxis.offsetText.get_window_extent())
    finally:
        plots.close(fig)


def embedded_glyphs(pdf: bytes) -> dict[str, str]:
    """Each character a PDF's Type 42 font draws -> the name of the glyph it draws (the CIDToGIDMap
    into the embedded subset; matplotlib's character codes are the characters' code points)."""
    import io
    import re
    import zlib

    from fontTools.ttLib import TTFont

    def stream(number: bytes) -> bytes:
        body = re.search(rb"\n" + number + rb" 0 obj\n(.*?)endobj", pdf, re.S).group(1)
        data = body[body.index(b"stream\n") + 7:body.rindex(b"endstream")]
        return zlib.decompress(data) if b"FlateDecode" in body[:body.index(b"stream\n")] else data

    drawn = {}
    for match in re.finditer(rb"/CIDToGIDMap (\d+) 0 R", pdf):
        cid_font = pdf[pdf.rindex(b" obj", 0, match.start()):match.start()]
        descriptor = re.search(rb"/FontDescriptor (\d+) 0 R", cid_font + pdf[match.start():match.start() + 400])
        file_ref = re.search(rb"\n" + descriptor.group(1) + rb" 0 obj\n.*?/FontFile2 (\d+) 0 R", pdf, re.S).group(1)
        font = TTFont(io.BytesIO(stream(file_ref)))
        order = font.getGlyphOrder()
        gids = stream(match.group(1))
        for code in range(32, 127):
            gid = int.from_bytes(gids[2 * code:2 * code + 2], "big")
            if gid:
                drawn[chr(code)] = order[gid]
    return drawn


def test_pdfs_share_font_subsets_and_draw_the_same_glyphs(tmp_path, monkeypatch):
    """The PDF's fonts are subsets made once per font and glyph set (fedepic.plots.shared_font_subsets):
    each character still maps to its own glyph, and a second figure of other text reuses the subset."""
    from matplotlib.backends import _backend_pdf_ps

    made = []
    original = _backend_pdf_ps.get_glyphs_subset
    monkeypatch.setattr(_backend_pdf_ps, "get_glyphs_subset", lambda f, g: made.append(len(g)) or original(f, g))
    plots._made_subset.cache_clear()
    texts = []
    for title in ("gossip: ABC xyz 123", "gp_epic: Qjk 0.5"):
        folder, _ = saved_png(tmp_path / title[:2], plots.panel_grid_figure({"a": {"accuracy": [0.1, 0.5]}},
                                                                             ["accuracy"], "round", title))
        texts.append(embedded_glyphs((folder / "f.pdf").read_bytes()))
    assert _backend_pdf_ps.get_glyphs_subset is not None and len(made) == 1  # one subset for both figures
    expected = {"A": "A", "z": "z", "1": "one", "_": "underscore", "Q": "Q", ".": "period", " ": "space"}
    for text in texts:
        assert {c: text[c] for c in expected if c in text} == {c: g for c, g in expected.items() if c in text}
    assert {"A", "z", "1"} <= set(texts[0]) and {"_", "Q", "."} <= set(texts[1])


@pytest.mark.parametrize("panels", [1, 2, 4, 7])
def test_computed_grid_margins_keep_every_label_apart_and_inside(panels):
    """PanelGridLayout (a panel grid without a legend outside the axes): each panel's tick labels,
    labels, title and multiplier stay inside the figure, apart from the other panels and the titles."""
    metrics = ["mean_accuracy", "consensus_distance", "exclusive_accuracy", "train_loss", "detection_recall",
               "worst_accuracy", "seconds"]
    values = {"consensus_distance": [2e-5, 7e-5, 1.5e-4], "train_loss": [2.31, 1.2, 0.4], "seconds": [1200.0, 15.0, 4e4]}
    series = {m: values.get(m, [0.1 + 0.01 * i, 0.55, 0.999]) for i, m in enumerate(metrics[:panels])}
    fig = plots.curves_figure(series, "round", "a long setting title: decentralized MNIST, 20 nodes (4 malicious), "
                                               "small_world (k=4, p=0.2), attack label_flip, seed 0")
    try:
        assert isinstance(fig.get_layout_engine(), plots.PanelGridLayout)
        fig.canvas.draw()
        boxes = [ax.get_tightbbox() for ax in fig.axes if ax.get_lines()]
        assert len(boxes) == panels
        assert all(inside(fig, ax) for ax in fig.axes if ax.get_lines()) and inside(fig, fig._suptitle)
        frame = fig.bbox
        assert all(b.x0 >= frame.x0 - 1 and b.y0 >= frame.y0 - 1 and b.x1 <= frame.x1 + 1 and b.y1 <= frame.y1 + 1
                   for b in boxes)
        title = fig._suptitle.get_window_extent()
        assert not any(b.overlaps(title) for b in boxes)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        sizes = {tuple(round(v, 6) for v in ax.get_position().size) for ax in fig.axes}
        assert len(sizes) == 1  # every panel the same size
    finally:
        plots.close(fig)


@pytest.mark.parametrize("make", ["curves", "heatmap"])
def test_save_figure_lays_out_once_and_draws_each_format_once(tmp_path, make):
    """With a layout engine set, savefig would draw the figure an extra time before each format;
    save_figure lays it out once and removes the engine, so each format is drawn once."""
    if make == "curves":
        fig = plots.curves_figure(member_series(1.0), "round", "gp")
    else:
        fig = plots.heatmap_figure([[10.0, 90.0], [50.0, 20.0]], ["a", "b"], ["0", "1"], "t", "test accuracy (%)")
    draws = []
    fig.canvas.mpl_connect("draw_event", lambda event: draws.append(event))
    engine = type(fig.get_layout_engine())
    placed = []
    original = engine.execute
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "execute", lambda self, f: placed.append(f) or original(self, f))
        folder, names = saved_png(tmp_path, fig, dpi=120)
    assert len(draws) == 2 and len(placed) == 1 and fig.get_layout_engine() is None
    assert all(inside(fig, ax) for ax in fig.axes)
