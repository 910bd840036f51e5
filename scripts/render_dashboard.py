"""Render deploy/grafana/kvfold-dashboard.json from a live Prometheus as one HTML page, and
screenshot it with headless Chromium.

Grafana is not installable on the test machines (no Debian or PyPI package), so this draws the
dashboard's own panels, layout and PromQL with plain SVG: every number on the page is the answer of
the Prometheus HTTP API to the panel's query. It is a preview for docs and tests, not Grafana.

    python scripts/render_dashboard.py PROMETHEUS_URL OUT.png [--minutes 5]
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "kvfold-dashboard.json"
WIDTH, ROW_PX = 1600, 34
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9"]


@dataclass
class Series:
    legend: str
    points: list[tuple[float, float]]


def substitute(expr: str, rate_interval: str) -> str:
    return (expr.replace('=~"$model_name"', '=~".*"').replace("$__rate_interval", rate_interval))


def legend_of(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace("{{", "").replace("}}", "") or ",".join(f"{k}={v}" for k, v in labels.items())


def query_panel(prom: str, panel: dict, start: float, end: float, step: float,
                rate_interval: str) -> list[Series]:
    series = []
    for target in panel.get("targets", []):
        response = requests.get(f"{prom}/api/v1/query_range", timeout=30, params={
            "query": substitute(target["expr"], rate_interval),
            "start": start, "end": end, "step": step})
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{panel['title']}: {body}")
        for result in body["data"]["result"]:
            points = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
            if points:
                series.append(Series(legend_of(target.get("legendFormat", ""), result["metric"]), points))
    return series


def fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.4g} {suffix}"
            value /= 1024
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.3g} req/s"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def stat_svg(series: list[Series], unit: str, w: float, h: float) -> str:
    if not series:
        return f'<div class="nodata" style="height:{h}px">No data</div>'
    cells = "".join(
        f'<div class="stat"><div class="value" style="color:{COLORS[i % len(COLORS)]}">'
        f"{html.escape(fmt(s.points[-1][1], unit))}</div>"
        f'<div class="legend">{html.escape(s.legend)}</div></div>'
        for i, s in enumerate(series))
    return f'<div class="stats" style="height:{h}px">{cells}</div>'


def timeseries_svg(series: list[Series], unit: str, w: float, h: float) -> str:
    if not series:
        return f'<div class="nodata" style="height:{h}px">No data</div>'
    left, bottom, plot_h = 70, 18, h - 18 - 22 * ((len(series) + 2) // 3)
    ts = [t for s in series for t, _ in s.points]
    vs = [v for s in series for _, v in s.points]
    t0, t1 = min(ts), max(ts) if max(ts) > min(ts) else min(ts) + 1
    v0, v1 = min(0.0, min(vs)), max(vs)
    v1 = v1 if v1 > v0 else v0 + 1
    plot_w = w - left - 10

    def xy(t: float, v: float) -> str:
        return f"{left + (t - t0) / (t1 - t0) * plot_w:.1f},{plot_h - (v - v0) / (v1 - v0) * (plot_h - 8):.1f}"

    parts = [f'<svg width="{w}" height="{plot_h + bottom}">']
    for frac in (0, 0.5, 1):
        y = plot_h - frac * (plot_h - 8)
        parts.append(f'<line x1="{left}" x2="{w - 10}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
                     f"{html.escape(fmt(v0 + frac * (v1 - v0), unit))}</text>")
    for t, anchor in ((t0, "start"), (t1, "end")):
        label = time.strftime("%H:%M:%S", time.gmtime(t))
        x = left if anchor == "start" else w - 10
        parts.append(f'<text x="{x}" y="{plot_h + 14}" class="axis" text-anchor="{anchor}">{label}</text>')
    for i, s in enumerate(series):
        points = " ".join(xy(t, v) for t, v in s.points)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="2"/>')
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{COLORS[i % len(COLORS)]}"></i>{html.escape(s.legend)}</span>'
                     for i, s in enumerate(series))
    return "".join(parts) + f'<div class="legends">{legend}</div>'


def render_html(prom: str, dashboard: dict, start: float, end: float, step: float,
                rate_interval: str) -> tuple[str, dict[str, int]]:
    """The page, and how many series each panel got (title -> count)."""
    boxes, counts = [], {}
    height = 0
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        x, y, w = g["x"] * WIDTH / 24, g["y"] * ROW_PX, g["w"] * WIDTH / 24 - 8
        h = g["h"] * ROW_PX - 8
        height = max(height, y + h + 8)
        if panel["type"] == "row":
            boxes.append(f'<div class="row" style="left:{x}px;top:{y}px;width:{w}px">'
                         f'{html.escape(panel["title"])}</div>')
            continue
        series = query_panel(prom, panel, start, end, step, rate_interval)
        counts[panel["title"]] = len(series)
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        body = (stat_svg if panel["type"] == "stat" else timeseries_svg)(series, unit, w - 16, h - 36)
        boxes.append(f'<div class="panel" style="left:{x}px;top:{y}px;width:{w}px;height:{h}px">'
                     f'<div class="title">{html.escape(panel["title"])}</div>{body}</div>')
    page = f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin:0; background:#111217; font-family:Inter,Helvetica,Arial,sans-serif; color:#ccccdc; }}
header {{ padding:10px 16px; font-size:18px; color:#fff; }}
header small {{ color:#8e8e98; font-size:12px; margin-left:12px; }}
main {{ position:relative; height:{height}px; margin:0 8px; }}
.panel {{ position:absolute; background:#181b1f; border:1px solid #2c3235; border-radius:3px; padding:6px 8px; box-sizing:border-box; overflow:hidden; }}
.row {{ position:absolute; font-size:15px; font-weight:600; color:#fff; padding-top:6px; }}
.title {{ font-size:13px; font-weight:500; margin-bottom:6px; }}
.stats {{ display:flex; gap:12px; align-items:center; justify-content:space-around; }}
.stat .value {{ font-size:30px; font-weight:500; text-align:center; }}
.stat .legend, .legends {{ font-size:11px; color:#8e8e98; text-align:center; }}
.legends span {{ margin-right:12px; white-space:nowrap; }}
.legends i {{ display:inline-block; width:12px; height:3px; margin-right:4px; vertical-align:middle; }}
.nodata {{ display:flex; align-items:center; justify-content:center; color:#6e6e78; }}
.grid {{ stroke:#2c3235; }} .axis {{ fill:#8e8e98; font-size:10px; }}
</style></head><body><header>{html.escape(dashboard["title"])}
<small>rendered from Prometheus {html.escape(prom)} by scripts/render_dashboard.py,
{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(end))}</small></header>
<main>{"".join(boxes)}</main></body></html>"""
    return page, counts


def screenshot(page: str, out: Path, height: int = 1500) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise FileNotFoundError("chromium not installed (Debian package chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        html_path = Path(tmp) / "dashboard.html"
        html_path.write_text(page)
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp}/profile", f"--window-size={WIDTH + 16},{height}",
             f"--screenshot={out}", html_path.as_uri()],
            check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prometheus")
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--rate-interval", default="1m")
    args = parser.parse_args()
    end = time.time()
    page, counts = render_html(args.prometheus, json.loads(DASHBOARD.read_text()),
                               end - args.minutes * 60, end, max(1.0, args.minutes * 60 / 300),
                               args.rate_interval)
    screenshot(page, args.out)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
