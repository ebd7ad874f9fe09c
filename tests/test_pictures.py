"""Section 8: the figures have the panels, titles and data they promise (no window is opened)."""

import io

import numpy as np
import pytest
import torch
from helpers import Oracle
from matplotlib.figure import Figure

import diffusion_utils as du


def image_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.images]


def test_plot_grid_shows_each_image_once_and_hides_spare_cells():
    images = du.make_shapes(5, seed=0).images
    fig = du.plot_grid(images, titles=[f"#{k}" for k in range(5)], columns=4, title="five")
    assert isinstance(fig, Figure) and len(fig.axes) == 8
    shown = image_axes(fig)
    assert [ax.get_title() for ax in shown] == ["#0", "#1", "#2", "#3", "#4"]
    assert np.array_equal(shown[2].images[0].get_array(), images[2, 0].numpy())
    assert shown[0].images[0].get_clim() == (-1, 1)
    assert sum(not ax.axison for ax in fig.axes) == 3
    assert fig.get_suptitle() == "five"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:4] == b"\x89PNG"


def test_plot_forward_process_noises_one_image_to_each_t():
    schedule = du.NoiseSchedule.create("linear", 1000)
    x0 = du.make_shapes(1, seed=0).images
    fig = du.plot_forward_process(schedule, x0, ts=(0, 500, 999), seed=3)
    shown = image_axes(fig)
    assert [ax.get_title().split("\n")[0] for ax in shown] == ["x_0", "t=0", "t=500", "t=999"]
    assert shown[3].get_title().endswith(f"{float(schedule.alpha_bars[999]):.3f}")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    expected = schedule.add_noise(x0, noise, torch.tensor([500]))[0, 0].clamp(-1, 1)
    assert np.allclose(shown[2].images[0].get_array(), expected.numpy())


def test_plot_backward_process_lays_out_steps_by_samples():
    schedule = du.NoiseSchedule.create("cosine", 1000)
    oracle_x0 = du.make_shapes(4, seed=1).images
    result = du.sample(
        Oracle(schedule, oracle_x0, "v"),
        schedule,
        4,
        steps=5,
        sampler="ddim",
        spacing="time",
        prediction="v",
        save_at=(0, 2, 4),
        progress=False,
    )
    fig = du.plot_backward_process(result, rows=4)
    assert len(fig.axes) == 4 * (3 * 2 + 1)  # x_t and x0_hat at each saved step, then the finished sample
    titles = ["x_t at t=999", "x̂_0 at t=999", "x_t at t=500", "x̂_0 at t=500", "x_t at t=0", "x̂_0 at t=0", "sample"]
    assert [ax.get_title() for ax in fig.axes[:7]] == titles
    assert np.allclose(fig.axes[6].images[0].get_array(), result.images[0, 0].numpy())
    assert len(du.plot_backward_process(result, rows=2, show_x0=False).axes) == 2 * (3 + 1)


@pytest.mark.parametrize(("n", "lines"), [(10, 1), (60, 2)])
def test_plot_losses_adds_a_running_mean_once_there_are_enough_points(n, lines):
    losses = list(np.linspace(1.0, 0.1, n))
    fig = du.plot_losses(losses, smooth=50)
    ax = fig.axes[0]
    assert len(ax.lines) == lines and ax.get_yscale() == "log"
    assert np.allclose(ax.lines[0].get_ydata(), losses)
    if lines == 2:
        assert np.allclose(ax.lines[1].get_ydata()[0], np.mean(losses[:50]))


def test_plot_schedules_and_time_embedding():
    fig = du.plot_schedules(100)
    left, right = fig.axes
    assert [line.get_label() for line in left.lines] == ["linear", "cosine", "flow"]
    assert np.allclose(left.lines[1].get_ydata(), du.NoiseSchedule.create("cosine", 100).alpha_bars.numpy())
    heat = du.plot_time_embedding(dim=16, num_timesteps=50)
    assert heat.axes[0].images[0].get_array().shape == (16, 50)


def test_the_backward_figure_shows_the_chosen_rows_and_the_rows_take_the_classes_in_turn():
    schedule = du.NoiseSchedule.create("cosine", 1000)
    batch = du.make_shapes(8, seed=3)
    result = du.sample(
        Oracle(schedule, batch.images, "v"),
        schedule,
        8,
        steps=3,
        sampler="ddim",
        prediction="v",
        save_at=(0,),
        progress=False,
    )
    rows = du.mixed_classes(result.images, 4)
    labels = [int(batch.labels[j]) for j in rows]
    assert len(set(rows)) == 4 and labels[:2] in ([0, 1], [1, 0]) and labels[2:] in ([0, 1], [1, 0])
    fig = du.plot_backward_process(result, rows=rows)
    assert len(fig.axes) == 4 * 3
    shown = fig.axes[2].images[0].get_array()  # the first row's finished sample
    assert np.allclose(shown, result.images[rows[0]].squeeze().numpy())


def test_row_labels_sit_at_the_left_of_each_row():
    fig = du.plot_grid(torch.zeros(6, 1, 64, 64), columns=3, row_labels=["a long label for row one", "two"])
    assert [ax.get_ylabel() for ax in fig.axes] == ["a long label for row one", "", "", "two", "", ""]
    assert fig.get_size_inches()[0] > 3 * 1.1  # wider than the images alone, so the labels are not cut


def test_percent_with_error_is_the_binomial_standard_error():
    assert du.percent_with_error(0.97, 64) == "97.0 ± 2.1 %"  # sqrt(0.97 * 0.03 / 64) = 0.0213
    assert du.percent_with_error(1.0, 256) == "100.0 ± 0.0 %"
    assert du.percent_with_error(float("nan"), 10) == "-"


def test_save_figure_writes_a_palette_png_that_looks_the_same(tmp_path):
    """The saved file is a 256-colour PNG of the figure's size, each pixel within a few levels of the full-colour
    rendering (a grid of shapes with red and green outlines, as the notebook saves them)."""
    from PIL import Image as PillowImage

    images = du.make_shapes(4, seed=0).images
    fig = du.plot_grid(images, columns=4, outline=[True, False, None, True])
    full = tmp_path / "full.png"
    fig.savefig(full, dpi=100)
    path = du.save_figure(fig, tmp_path / "figure.png")
    with PillowImage.open(path) as saved, PillowImage.open(full) as reference:
        assert saved.mode == "P" and saved.size == reference.size
        difference = np.abs(np.asarray(saved.convert("RGB"), float) - np.asarray(reference.convert("RGB"), float))
    assert difference.mean() < 1.0 and np.percentile(difference, 99.9) < 24
