"""HR@K over time per policy, from a replay report, as a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any


def plot_hr_over_time(report: dict[str, Any], path: Path, title: str = "HR over time") -> None:
    """Draw each policy's HR@K per bin of equal event counts (``report["hr_over_time"]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    series = report["hr_over_time"]
    k = report["protocol"]["k"]
    dates = [dt.datetime(1970, 1, 1) + dt.timedelta(days=d + 1) for d in series["bin_last_day"]]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    for name, values in series["hr"].items():
        overall = report["results"][name][f"HR@{k}"]
        label = f"{name} ({overall:.3f})" if overall is not None else name
        ax.plot(dates, values, marker="o", markersize=3, linewidth=1.5, label=label)
    ax.set_title(title)
    ax.set_ylabel(f"HR@{k} (bins of ~{round(sum(series['events']) / max(len(dates), 1))} events)")
    ax.set_xlabel("event time (end of bin, UTC)")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
