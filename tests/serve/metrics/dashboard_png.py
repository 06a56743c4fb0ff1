"""The main dashboard's panels drawn with matplotlib from a test Prometheus's data, for a reviewer to look at.

Each panel's queries run as range queries over the test's window, with Grafana's variables substituted as
an ad-hoc query would have them, and a short rate window so a minute-long load shows its shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from .prometheus_server import Prometheus  # noqa: E402
from .promql import DASHBOARDS_DIR, GRAFANA_VARIABLES  # noqa: E402

MAIN_DASHBOARD = DASHBOARDS_DIR / "k2ray-serving.json"
RATE_WINDOW = "30s"  # three of Ray's 10 s metric reports, short next to the two loads
NUM_COLUMNS = 3
PANEL_SIZE_IN = (5.5, 3.0)
STEP_S = 1.0
DPI = 80


def _expr(expr: str) -> str:
    for name, value in {**GRAFANA_VARIABLES, "$__rate_interval": RATE_WINDOW}.items():
        expr = expr.replace(name, value)
    return expr


def _legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def _draw_panel(ax, prom: Prometheus, section: str, panel: dict, start: float, end: float) -> int:
    """Plot the panel's series; how many points it got."""
    num_points = 0
    for target in panel["targets"]:
        for series in prom.query_range(_expr(target["expr"]), start, end, STEP_S):
            points = [(float(t) - start, float(v)) for t, v in series["values"] if math.isfinite(float(v))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=_legend(target["legendFormat"], series["metric"]))
                num_points += len(points)
    ax.set_title(f"{section} / {panel['title']}", fontsize=9)
    ax.set_xlabel("s since the load began", fontsize=7)
    ax.tick_params(labelsize=7)
    if num_points:
        ax.legend(fontsize=6, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return num_points


def draw_dashboard(prom: Prometheus, start: float, end: float, paths: list[Path],
                   dashboard_path: Path = MAIN_DASHBOARD) -> dict[str, int]:
    """Draw every panel of the dashboard into one PNG at each of `paths`; panel title -> points drawn."""
    dashboard = json.loads(dashboard_path.read_text())
    panels, section = [], ""
    for p in dashboard["panels"]:
        if p["type"] == "row":
            section = p["title"]
        else:
            panels.append((section, p))
    num_rows = math.ceil(len(panels) / NUM_COLUMNS)
    fig, axes = plt.subplots(num_rows, NUM_COLUMNS, squeeze=False,
                             figsize=(PANEL_SIZE_IN[0] * NUM_COLUMNS, PANEL_SIZE_IN[1] * num_rows))
    drawn = {}
    for ax, (section, panel) in zip(axes.flat, panels, strict=False):
        drawn[panel["title"]] = _draw_panel(ax, prom, section, panel, start, end)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} (drawn from the test's Prometheus)")
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return drawn
