"""`tether report RUN_DIR`: one self-contained HTML page for a PPO run.

Reads `metrics.jsonl`, `samples.jsonl`, `config.yaml` and `summary.json` from a run directory and
writes `report.html` plus one PNG per plot in `plots/`. Every image is embedded as a base64 data URI
and the style is inline, so the page opens offline and can be mailed as one file.

The gold-vs-proxy plot follows Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization": with d = sqrt(KL(π‖π_ref)) the gold reward of RL follows R(d) = d(α − β·log d),
so the proxy keeps rising while the gold score peaks and falls.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimeSeriesPlot:
    stem: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metric name, legend label); eval series are sparse, drawn as markers


TIME_SERIES_PLOTS = (
    TimeSeriesPlot("proxy_score", "Proxy score (reward model or function)", "score",
                   (("reward/score", "train"), ("eval/score", "eval"))),
    TimeSeriesPlot("gold_score", "Gold score", "gold score", (("gold/score", "train"), ("eval/gold", "eval"))),
    TimeSeriesPlot("kl", "KL to the reference (nats per response)", "KL", (("kl/mean", "train"), ("eval/kl", "eval"))),
    TimeSeriesPlot("kl_coef", "KL coefficient β", "β", (("kl/coef", "kl/coef"),)),
    TimeSeriesPlot("entropy", "Policy entropy (nats per token)", "entropy", (("policy/entropy", "policy/entropy"),)),
    TimeSeriesPlot("response_length", "Response length (tokens)", "tokens",
                   (("response/length", "response/length"),)),
    TimeSeriesPlot("clipfrac", "Policy clip fraction", "fraction", (("policy/clipfrac", "policy/clipfrac"),)),
)
GOLD_PROXY_VS_KL = "gold_proxy_vs_kl"
PLOT_NAMES: tuple[str, ...] = tuple(p.stem for p in TIME_SERIES_PLOTS) + (GOLD_PROXY_VS_KL,)

# (x metric, y metric, legend label, colour) for the gold/proxy-vs-KL plot: one colour per scorer.
_VS_KL_SERIES = (("kl/mean", "reward/score", "proxy (train)", "C0"), ("kl/mean", "gold/score", "gold (train)", "C1"),
                 ("eval/kl", "eval/score", "proxy (eval)", "C0"), ("eval/kl", "eval/gold", "gold (eval)", "C1"))


# ---------------------------------------------------------------------------------------------- reading a run


@dataclass
class Run:
    metrics: list[dict[str, Any]]  # one row per update, sorted; non-finite values removed
    logged_keys: set[str]  # every key in metrics.jsonl, finite or not: tells "not logged" from "all NaN"
    samples: list[dict[str, Any]]
    config_text: Optional[str]
    summary: dict[str, Any]
    doctor: list[dict[str, Any]]  # what the doctor said during the run (doctor.jsonl)


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        what = "run directory" if not run_dir.is_dir() else "file"
        missing = run_dir if not run_dir.is_dir() else metrics_path
        raise FileNotFoundError(f"{what} not found: {missing}; `tether report` needs a PPO run directory "
                                "with metrics.jsonl (and samples.jsonl, config.yaml)")
    samples_path, config_path, doctor_path = run_dir / "samples.jsonl", run_dir / "config.yaml", run_dir / "doctor.jsonl"
    raw = _read_jsonl(metrics_path)
    return Run(metrics=_clean_metrics(raw), logged_keys={key for row in raw for key in row},
               samples=_read_jsonl(samples_path) if samples_path.is_file() else [],
               config_text=config_path.read_text() if config_path.is_file() else None,
               summary=_read_summary(run_dir / "summary.json"),
               doctor=_read_jsonl(doctor_path) if doctor_path.is_file() else [])


def _read_jsonl(path: Path) -> list[dict]:
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a run killed mid-write leaves a truncated last line; the rest is still worth a report
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        log.warning("%s: skipped %d line(s) that are not valid JSON", path, bad)
    return rows


def _read_summary(path: Path) -> dict:
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def _finite(value: Any) -> Optional[float]:
    """A float, or None for anything else: tracking.JsonlSink writes NaN/inf as the strings "nan"/"inf"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _clean_metrics(rows: list[dict]) -> list[dict]:
    """Rows by update with only finite numbers. A resumed run re-logs updates after its checkpoint:
    the later row wins, since that is the history the final policy came from."""
    by_update: dict[int, dict] = {}
    for row in rows:
        if _finite(row.get("update")) is None:
            continue
        clean = {k: v for k, v in ((k, _finite(v)) for k, v in row.items()) if v is not None}
        clean["update"] = int(row["update"])
        by_update[clean["update"]] = clean
    return [by_update[u] for u in sorted(by_update)]


def series(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(updates, values) where `key` was logged with a finite value."""
    points = [(row["update"], row[key]) for row in metrics if key in row]
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def paired(metrics: list[dict], kl_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(d, y) with d = sqrt(KL) at updates where both are finite. A k1 KL estimate can dip just below 0
    on a batch; it is clamped at 0 rather than dropped."""
    rows = [row for row in metrics if kl_key in row and y_key in row]
    d = np.sqrt(np.maximum([row[kl_key] for row in rows], 0.0)) if rows else np.array([])
    return d, np.array([row[y_key] for row in rows], dtype=float)


# ------------------------------------------------------------------------------------ Gao et al. 2022 fit


@dataclass(frozen=True)
class GaoFit:
    """R(d) = d(α − β·log d): Gao et al. 2022's functional form for the gold reward of RL."""

    alpha: float
    beta: float
    n_points: int

    def __call__(self, d: np.ndarray) -> np.ndarray:
        d = np.asarray(d, dtype=float)
        safe = np.where(d > 0, d, 1.0)
        return np.where(d > 0, d * (self.alpha - self.beta * np.log(safe)), 0.0)  # R(d) → 0 as d → 0

    @property
    def peak_d(self) -> Optional[float]:
        """dR/dd = α − β(log d + 1) = 0 at d* = exp(α/β − 1); no interior maximum unless β > 0."""
        return math.exp(self.alpha / self.beta - 1) if self.beta > 0 else None


def fit_gao_rl(d: np.ndarray, gain: np.ndarray) -> Optional[GaoFit]:
    """Least-squares α, β of R(d) = d(α − β log d) to (d, gold − initial gold) points.

    R/d = α − β·log d is linear in (α, β), so this is ordinary least squares on the points with d > 0.
    None when fewer than two distinct d > 0 (the two parameters are not determined).
    """
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    keep = (d > 0) & np.isfinite(d) & np.isfinite(gain)
    d, gain = d[keep], gain[keep]
    if len(np.unique(d)) < 2:
        return None
    design = np.stack([np.ones_like(d), -np.log(d)], axis=1)  # (N, 2) columns for α and β
    (alpha, beta), *_ = np.linalg.lstsq(design, gain / d, rcond=None)
    return GaoFit(float(alpha), float(beta), int(len(d)))


@dataclass(frozen=True)
class GoldFit:
    fit: GaoFit
    source: str  # which series was fit, for the label
    gold0: float  # gold score at the first update: the fit is on gold − gold0
    d_max: float  # largest observed d: a peak beyond it is an extrapolation


def fit_run_gold(metrics: list[dict]) -> Optional[GoldFit]:
    """Fit the eval gold series when it has at least 3 usable points (fixed prompts: less sampling
    noise between updates), else the train gold series."""
    for kl_key, gold_key, min_points in (("eval/kl", "eval/gold", 3), ("kl/mean", "gold/score", 2)):
        _, golds = series(metrics, gold_key)
        d, gold = paired(metrics, kl_key, gold_key)
        if len(golds) == 0 or int(np.sum(d > 0)) < min_points:
            continue
        fit = fit_gao_rl(d, gold - golds[0])
        if fit is not None:
            return GoldFit(fit, f"{gold_key} vs √{kl_key}", float(golds[0]), float(d.max()))
    return None


# --------------------------------------------------------------------------------------------------- plots


def _new_figure(title: str, xlabel: str, ylabel: str):
    # Figure() without pyplot renders with Agg, needs no display and never switches the caller's
    # backend (pyplot + matplotlib.use("Agg") would, e.g. inside a notebook).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> str:
    """Write the PNG and return it as a data URI for the page."""
    fig.savefig(path, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _missing_reason(keys: list[str], logged_keys: set[str]) -> str:
    logged = [k for k in keys if k in logged_keys]
    if logged:
        return f"{', '.join(logged)} logged, but never with a finite value"
    return f"not logged ({', '.join(keys)})"


def draw_time_series(plot: TimeSeriesPlot, metrics: list[dict], path: Path) -> Optional[str]:
    drawn = [(label, *series(metrics, key)) for key, label in plot.series]
    drawn = [(label, x, y) for label, x, y in drawn if len(x)]
    if not drawn:
        return None
    fig, ax = _new_figure(plot.title, "update", plot.ylabel)
    for label, x, y in drawn:
        style = dict(marker="o", markersize=4) if label == "eval" or len(x) == 1 else {}
        ax.plot(x, y, label=label, **style)
    if len(drawn) > 1:
        ax.legend()
    return _save(fig, path)


def draw_gold_proxy_vs_kl(metrics: list[dict], gold_fit: Optional[GoldFit], path: Path) -> Optional[str]:
    points = [(label, colour, *paired(metrics, kl_key, y_key)) for kl_key, y_key, label, colour in _VS_KL_SERIES]
    points = [(label, colour, d, y) for label, colour, d, y in points if len(d)]
    if not points:
        return None
    fig, ax = _new_figure("Gold and proxy against KL (Gao et al. 2022)", "d = √KL(π‖π_ref)  (√nats)", "score")
    for label, colour, d, y in points:
        # Sparse eval points on fixed prompts stand out; dense, noisier train points recede.
        style = dict(marker="D", markersize=6) if "eval" in label else dict(marker="o", markersize=3, alpha=0.6)
        ax.plot(d, y, linestyle="none", color=colour, label=label, **style)
    if gold_fit is not None:
        grid = np.linspace(0, gold_fit.d_max * 1.1, 200)
        fit = gold_fit.fit
        ax.plot(grid, gold_fit.gold0 + fit(grid), color="black", linewidth=1.5,
                label=f"fit: gold₀ + d({fit.alpha:.3g} − {fit.beta:.3g}·log d)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def draw_plots(metrics: list[dict], logged_keys: set[str], gold_fit: Optional[GoldFit], plots_dir: Path):
    """Every plot in PLOT_NAMES: ([(stem, title, data URI)], [(stem, title, why skipped)])."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    drawn, skipped = [], []
    for plot in TIME_SERIES_PLOTS:
        uri = draw_time_series(plot, metrics, plots_dir / f"{plot.stem}.png")
        keys = [key for key, _ in plot.series]
        entry = (plot.stem, plot.title, uri or _missing_reason(keys, logged_keys))
        (drawn if uri else skipped).append(entry)
    title = "Gold and proxy against KL"
    uri = draw_gold_proxy_vs_kl(metrics, gold_fit, plots_dir / f"{GOLD_PROXY_VS_KL}.png")
    reason = "needs kl/mean with reward/score or gold/score (or eval/kl with eval/score or eval/gold)"
    (drawn if uri else skipped).append((GOLD_PROXY_VS_KL, title, uri or f"not logged: {reason}"))
    for stem, _, _ in skipped:
        (plots_dir / f"{stem}.png").unlink(missing_ok=True)  # a stale plot from an earlier build would mislead
    return drawn, skipped


# ------------------------------------------------------------------------------------------------- summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _first_last(metrics: list[dict], key: str, label: str) -> list[tuple[str, str]]:
    updates, values = series(metrics, key)
    if not len(values):
        return []
    return [(f"{label} ({key}), first → last",
             f"{values[0]:.4g} (update {updates[0]:.0f}) → {values[-1]:.4g} (update {updates[-1]:.0f})")]


def _fit_rows(gold_fit: Optional[GoldFit]) -> list[tuple[str, str]]:
    if gold_fit is None:
        return []
    fit, label = gold_fit.fit, "Gao et al. RL fit, gold − gold₀ = d(α − β·log d)"
    peak = fit.peak_d
    if peak is None:
        where = "no peak: β ≤ 0, the fitted gold is still rising"
    else:
        where = f"d* = {peak:.4g} (KL ≈ {peak ** 2:.4g} nats), fitted gold {gold_fit.gold0 + fit.beta * peak:.4g}"
        if peak > gold_fit.d_max:
            where += f"; beyond the largest observed d = {gold_fit.d_max:.4g} (an extrapolation)"
    return [(f"{label}: α", f"{fit.alpha:.4g}"), (f"{label}: β", f"{fit.beta:.4g}"),
            ("fitted gold peak, d* = exp(α/β − 1)", where),
            ("fit points", f"{fit.n_points} points with d > 0 ({gold_fit.source}); gold₀ = {gold_fit.gold0:.4g}")]


def summary_rows(run: Run, extra: Optional[dict], gold_fit: Optional[GoldFit]) -> list[tuple[str, str]]:
    given = {**run.summary, **(extra or {})}  # extra wins over summary.json
    rows = [(str(k), _fmt(v)) for k, v in given.items()]
    updates = [row["update"] for row in run.metrics]
    rows.append(("updates logged", f"{len(updates)} ({updates[0]}–{updates[-1]})" if updates else "0"))
    for key, label in (("reward/score", "proxy score"), ("gold/score", "gold score"), ("kl/mean", "KL"),
                       ("eval/score", "eval proxy score"), ("eval/gold", "eval gold score")):
        rows += _first_last(run.metrics, key, label)
    return rows + _fit_rows(gold_fit)


# ------------------------------------------------------------------------------------------------- samples


def choose_updates(updates: list[int]) -> list[int]:
    """First, closest to the middle of the run (earlier on a tie), and last; without repeats."""
    first, last = min(updates), max(updates)
    middle = min(sorted(updates), key=lambda u: abs(u - (first + last) / 2))
    return sorted({first, middle, last})


def _sample_cell(row: dict) -> str:
    scores = f"score {_fmt(row.get('score'))}" + (f" · gold {_fmt(row['gold'])}" if "gold" in row else "")
    return f'<div class="response">{html.escape(str(row.get("response", "")))}</div><div class="score">{scores}</div>'


def _side_by_side(by_update: dict[int, dict[str, dict]], chosen: list[int]) -> str:
    head = "".join(f"<th>update {u}</th>" for u in chosen)
    rows = []
    for prompt in by_update[chosen[0]]:
        cells = "".join(f"<td>{_sample_cell(by_update[u][prompt])}</td>" for u in chosen)
        rows.append(f"<tr><td>{html.escape(prompt)}</td>{cells}</tr>")
    return f'<table id="samples-side-by-side"><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table>'


def _per_update(rows: list[dict], chosen: list[int]) -> str:
    parts = []
    for u in chosen:
        body = "".join(f"<tr><td>{html.escape(str(r.get('prompt', '')))}</td><td>{_sample_cell(r)}</td></tr>"
                       for r in rows if r["update"] == u)
        parts.append(f'<h3>update {u}</h3><table class="samples-update"><tr><th>prompt</th><th>response</th></tr>'
                     f"{body}</table>")
    return "".join(parts)


def samples_html(samples: list[dict]) -> str:
    """The eval split (fixed prompts) if logged, else train, at the first, middle and last sampled update.
    Side by side when those updates share exactly the same prompts, else one table per update."""
    samples = [s for s in samples if _finite(s.get("update")) is not None]
    if not samples:
        return "<p>No samples logged (samples.jsonl is missing or empty).</p>"
    split = "eval" if any(s.get("split") == "eval" for s in samples) else "train"
    rows = [s for s in samples if s.get("split", "train") == split]
    chosen = choose_updates([int(s["update"]) for s in rows])
    by_update: dict[int, dict[str, dict]] = {u: {} for u in chosen}
    for r in rows:
        if r["update"] in by_update:
            by_update[r["update"]].setdefault(str(r.get("prompt", "")), r)  # first row per prompt
    same = all(by_update[u].keys() == by_update[chosen[0]].keys() for u in chosen)
    table = _side_by_side(by_update, chosen) if same else _per_update(rows, chosen)
    note = "same prompts at each update" if same else "prompts differ between updates, so one table per update"
    return f"<p>Split: <b>{split}</b>; updates {', '.join(map(str, chosen))}; {note}.</p>{table}"


# ---------------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
nav a { margin-right: 1rem; } .muted { color: #666; }
table { border-collapse: collapse; margin: 0.5rem 0; width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.35rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
#doctor li.critical b { color: #b00; } #doctor li.warning b { color: #a60; } #doctor li.info b { color: #666; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
figure { margin: 0; } img { max-width: 100%; } figcaption { font-size: 0.9rem; color: #555; }
.response { white-space: pre-wrap; font-family: ui-monospace, monospace; } .score { color: #666; font-size: 0.85rem; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; }
"""


def _table(rows: list[tuple[str, str]], table_id: str) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table id="{table_id}">{body}</table>'


def _plots_html(drawn: list, skipped: list) -> str:
    figures = "".join(f'<figure id="plot-{stem}"><img src="{uri}" alt="{html.escape(title)}">'
                      f"<figcaption>{html.escape(title)} — plots/{stem}.png</figcaption></figure>"
                      for stem, title, uri in drawn)
    missing = "".join(f"<li>{html.escape(title)} (plots/{stem}.png): {html.escape(why)}</li>"
                      for stem, title, why in skipped)
    return f'<div class="plots">{figures}</div>' + (f'<h3>Not plotted</h3><ul id="not-logged">{missing}</ul>'
                                                   if skipped else "")


def doctor_html(said: list[dict]) -> str:
    if not said:
        return '<p id="doctor-clear">The doctor saw none of the failure modes it watches for (docs/doctor.md).</p>'
    items = "".join(_finding_html(row) for row in said)
    return f'<ul id="doctor">{items}</ul>'


def _finding_html(row: dict) -> str:
    severity = html.escape(str(row.get("severity", "warning")))  # rows of older runs have none
    return f'<li class="{severity}"><b>{severity}</b> {html.escape(str(row.get("message", "")))}</li>'


def render_page(title: str, run_dir: Path, summary: list, drawn: list, skipped: list, samples: str,
                config_text: Optional[str], doctor: str) -> str:
    config = (f"<pre>{html.escape(config_text)}</pre>" if config_text is not None
              else "<p>No config.yaml in the run directory.</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>"
            f'<h1>{html.escape(title)}</h1><p class="muted">{html.escape(str(run_dir))}</p>'
            '<nav><a href="#summary">summary</a><a href="#doctor-said">doctor</a><a href="#plots">plots</a>'
            '<a href="#samples">samples</a><a href="#config">config</a></nav>'
            f'<h2 id="summary">Summary</h2>{_table(summary, "summary-table")}'
            f'<h2 id="doctor-said">What the doctor said</h2>{doctor}'
            f'<h2 id="plots">Plots</h2>{_plots_html(drawn, skipped)}'
            f'<h2 id="samples">Samples</h2>{samples}'
            f'<h2 id="config">Config</h2>{config}</body></html>\n')


def build_report(run_dir: str | Path, extra: dict | None = None, title: str = "tether PPO run") -> Path:
    """Write run_dir/report.html (self-contained) and run_dir/plots/*.png; return the report's path.

    `extra` (e.g. SFT perplexity, reward-model accuracy, gold before/after) is shown at the top of the
    summary, merged over run_dir/summary.json. Raises FileNotFoundError without metrics.jsonl.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    gold_fit = fit_run_gold(run.metrics)
    drawn, skipped = draw_plots(run.metrics, run.logged_keys, gold_fit, run_dir / "plots")
    page = render_page(title, run_dir, summary_rows(run, extra, gold_fit), drawn, skipped,
                       samples_html(run.samples), run.config_text, doctor_html(run.doctor))
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
