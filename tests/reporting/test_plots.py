from fedtune.reporting import plots

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 2000


def test_every_figure_is_a_non_empty_png(tmp_path):
    # Act
    paths = [
        plots.loss_curves({"federated": [(0, 3.0), (1, 2.5), (2, 2.0)], "base": [(0, 3.0), (2, 3.0)]}, tmp_path / "a.png",
                          thin={"cat": [(0, 3.2), (2, 1.9)]}, dashed=["base"]),
        plots.category_bars({"base": {"x": 3.0, "y": 2.0}, "federated": {"x": 1.0, "y": float("nan")}}, tmp_path / "b.png",
                            ylabel="loss", title="t"),
        plots.participation([(1, [0, 2]), (2, [1])], 3, tmp_path / "c.png"),
        plots.partition_histogram({"0": {"x": 5, "y": 1}, "1": {"y": 7}}, tmp_path / "d" / "e.png"),
    ]

    # Assert
    assert all(is_png(p) for p in paths)


def test_plots_leave_no_pyplot_figures_behind(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.participation([(1, [0])], 1, tmp_path / "p.png")
    assert plt.get_fignums() == before
