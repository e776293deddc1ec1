"""`latentdiff plot RUN [--out FILE]`: a training run's metrics.csv as curves, one small panel per column.

Each column of metrics.csv (loss, grad_norm, lr, the held-out metrics, ...) is drawn against the step; a
loss column whose values are all positive on a log scale. Drawn with Pillow alone, so that it works with
the base install; the PNG goes to RUN/curves.png unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

PANEL = (360, 220)           # width, height of one panel in pixels
PANELS_PER_ROW = 3
MARGIN = (58, 24, 12, 22)    # left (y labels), top (title), right, bottom (x labels) inside a panel
LINE, AXES, TEXT = (31, 119, 180), (170, 170, 170), (40, 40, 40)


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a training run folder (it holds metrics.csv)")
    parser.add_argument("--out", help="the PNG to write (default: RUN/curves.png)")


def run_plot(args: argparse.Namespace) -> None:
    path = plot_run(args.run, args.out)
    print(f"wrote {path}")


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{column: [(step, value), ...]} for each column of metrics.csv with at least one finite value."""
    from .errors import DataError

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0]:
        raise DataError(f"{path}: no metrics rows yet (a run writes one every train.log_every steps)")
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, text in row.items():
            if name == "step" or not text:
                continue
            try:
                value = float(text)
            except ValueError:
                continue
            if math.isfinite(value):
                curves.setdefault(name, []).append((int(row["step"]), value))
    if not curves:
        raise DataError(f"{path}: no numeric values to plot")
    return curves


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN/metrics.csv into `out` (default RUN/curves.png); returns the PNG's path."""
    from PIL import Image, ImageDraw

    from .errors import ConfigError

    metrics = Path(run) / "metrics.csv"
    if not metrics.is_file():
        raise ConfigError(f"{run}: no metrics.csv here; give a training run folder (e.g. weights/autoencoder)")
    curves = read_metrics(metrics)
    columns = min(PANELS_PER_ROW, len(curves))
    rows = math.ceil(len(curves) / columns)
    image = Image.new("RGB", (columns * PANEL[0], rows * PANEL[1]), "white")
    draw = ImageDraw.Draw(image)
    for k, (name, points) in enumerate(curves.items()):
        row, col = divmod(k, columns)
        draw_panel(draw, (col * PANEL[0], row * PANEL[1]), name, points)
    path = Path(out) if out else Path(run) / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def draw_panel(draw, origin: tuple[int, int], name: str, points: list[tuple[int, float]]) -> None:
    """One curve with its name above and the first/last step and the value range on the axes."""
    from .grid import label_font

    font = label_font(11)
    log = "loss" in name and all(v > 0 for _, v in points)
    steps = [s for s, _ in points]
    values = [math.log10(v) if log else v for _, v in points]
    left, top = origin[0] + MARGIN[0], origin[1] + MARGIN[1]
    right, bottom = origin[0] + PANEL[0] - MARGIN[2], origin[1] + PANEL[1] - MARGIN[3]
    x_lo, x_hi = _padded_range(min(steps), max(steps))
    y_lo, y_hi = _padded_range(min(values), max(values))

    def xy(step: int, value: float) -> tuple[float, float]:
        return (left + (step - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=AXES)
    draw.text(((left + right) / 2, origin[1] + 4), name + (" (log scale)" if log else ""), fill=TEXT, font=font,
              anchor="mt")
    for value in {max(values), min(values)}:  # the curve's own extremes, at their heights
        label = f"{10 ** value if log else value:.3g}"
        draw.text((left - 4, xy(x_lo, value)[1]), label, fill=TEXT, font=font, anchor="rm")
    draw.text((left, bottom + 4), str(min(steps)), fill=TEXT, font=font, anchor="lt")
    draw.text((right, bottom + 4), f"step {max(steps)}", fill=TEXT, font=font, anchor="rt")
    line = [xy(s, v) for s, v in zip(steps, values)]
    if len(line) > 1:
        draw.line(line, fill=LINE, width=2)
    if len(line) <= 50:  # sparse curves (held-out metrics) show their points
        for x, y in line:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=LINE)


def _padded_range(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened by 5% (or by 1 when lo == hi) so that a curve never sits on the frame."""
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.1, 1.0)
    return lo - pad, hi + pad
