"""The evaluation report a person reads before trusting a promotion: one HTML file and its PNGs.

``write_report`` turns ``eval_report.json`` (the eval contract) and the training loss curves into
``report.html`` with plain relative ``<img>`` links to PNG files in the same folder, so the folder
can be logged to MLflow as artifacts, copied to the artifact root and opened from disk. No
JavaScript; every piece of text from the scores (prompts, answers, gate details) is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.eval.gates import Interval, model_interval

if TYPE_CHECKING:
    from matplotlib.axes import Axes

REPORT_FILE = "report.html"
LOSS_CURVES_PNG = "loss_curves.png"
BPB_PNG = "bits_per_byte.png"
INSTRUCTIONS_PNG = "instructions.png"

MODELS = ("base", "cpt", "candidate", "champion")
"""Models in the order they are shown (bars, table columns)."""

MODEL_COLORS = {"base": "#9e9e9e", "cpt": "#90caf9", "candidate": "#1565c0", "champion": "#2e7d32"}

BPB_METRICS = {
    "domain.bits_per_byte": "domain bits/byte (lower is better)",
    "general.bits_per_byte": "general bits/byte (lower is better)",
    "answer_loss.bits_per_byte": "answer bits/byte (lower is better)",
}
INSTRUCTION_METRICS = {
    "instructions.exact_match": "exact match",
    "instructions.rouge_l": "ROUGE-L",
    "instructions.json_valid": "valid JSON",
    "instructions.json_keys": "required JSON keys",
    "instructions.keywords": "keywords present",
    "judge.win_rate": "judge win rate vs champion",
}

Intervals = dict[str, dict[str, Interval]]
"""metric -> model -> interval, only for the models that have data for the metric."""

CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 80em; color: #212121; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bdbdbd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-family: monospace; }
tr.pass { background: #e8f5e9; } tr.fail { background: #ffebee; } tr.skip { background: #f5f5f5; }
.verdict-pass { color: #1b5e20; font-weight: bold; } .verdict-fail { color: #b71c1c; font-weight: bold; }
pre { white-space: pre-wrap; margin: 0; max-width: 30em; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #e0e0e0; }
"""


def write_report(
    report: dict[str, Any],
    loss_curves: Mapping[str, Sequence[tuple[int, float]]],
    out_dir: Path,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.9,
) -> Path:
    """Write ``report.html`` and its PNG plots into ``out_dir``.

    Args:
        report: the evaluate stage's report (``scores``, ``reference``, ``passed``, ``gates``,
            optional ``skipped``, ``samples``, ``champion_version``).
        loss_curves: training stage name (``cpt``, ``sft``) -> ``(step, loss)`` points.
        out_dir: folder to write into (created); existing files of the same names are replaced.
        bootstrap_samples: resamples for the per-model intervals (use ``eval.bootstrap_samples``).
        confidence: two-sided level of those intervals (use ``eval.confidence``).

    Returns:
        The path of ``report.html``; the PNGs it references lie next to it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    scores: dict[str, Any] = report["scores"]
    intervals = model_intervals(scores, bootstrap_samples, confidence)
    sections = [
        _summary(report, confidence, bootstrap_samples),
        _gate_section(report),
        _figure_section(
            "Training loss",
            LOSS_CURVES_PNG if plot_loss_curves(loss_curves, out_dir / LOSS_CURVES_PNG) else None,
            "no loss history was recorded",
        ),
        _figure_section(
            "Bits per byte on held-out documents",
            BPB_PNG if plot_bars(intervals, BPB_METRICS, out_dir / BPB_PNG) else None,
            "no documents were scored",
        ),
        _figure_section(
            "Instruction metrics on generated answers",
            INSTRUCTIONS_PNG
            if plot_bars(intervals, INSTRUCTION_METRICS, out_dir / INSTRUCTIONS_PNG)
            else None,
            "no answers were generated (eval.max_generations is 0)",
        ),
        _score_table(intervals, [m for m in MODELS if m in scores], confidence),
        _samples_section(report.get("samples", [])),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Evaluation report</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    path = out_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")  # last, so every image it links to exists
    return path


def model_intervals(scores: dict[str, Any], samples: int, confidence: float) -> Intervals:
    """Each model's own bootstrap interval for every metric of the report that it has data for."""
    out: Intervals = {}
    for metric in [*BPB_METRICS, *INSTRUCTION_METRICS]:
        per_model = {
            model: iv
            for model in MODELS
            if model in scores
            and (iv := model_interval(scores[model], metric, samples, confidence)) is not None
        }
        if per_model:
            out[metric] = per_model
    return out


# --- plots -----------------------------------------------------------------------------------


def plot_loss_curves(loss_curves: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> bool:
    """One panel per training stage, step against loss. Returns False (no file) without data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {stage: points for stage, points in loss_curves.items() if len(points) > 0}
    if not curves:
        return False
    # The object API with an explicit Agg canvas: no pyplot global state, no backend switch in
    # the caller's process.
    fig = Figure(figsize=(5.0 * len(curves), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (stage, points) in zip(
        fig.subplots(1, len(curves), squeeze=False)[0], curves.items(), strict=True
    ):
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, color="#1565c0", linewidth=1.2)
        ax.set_title(f"{stage} training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def plot_bars(intervals: Intervals, metrics: dict[str, str], path: Path) -> bool:
    """One panel per metric with data: a bar per model, its interval as the error bar.

    Returns False (no file) when none of ``metrics`` has data.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [m for m in metrics if m in intervals]
    if not shown:
        return False
    fig = Figure(figsize=(3.6 * len(shown), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, metric in zip(fig.subplots(1, len(shown), squeeze=False)[0], shown, strict=True):
        _bars(ax, intervals[metric], metrics[metric])
    fig.savefig(path, dpi=100)
    return True


def _bars(ax: Axes, per_model: dict[str, Interval], title: str) -> None:
    models = list(per_model)
    ivs = [per_model[m] for m in models]
    estimates = [iv.estimate for iv in ivs]
    # Percentile intervals need not be symmetric around the estimate.
    errors = [
        [max(iv.estimate - iv.low, 0.0) for iv in ivs],
        [max(iv.high - iv.estimate, 0.0) for iv in ivs],
    ]
    ax.bar(models, estimates, color=[MODEL_COLORS[m] for m in models])
    ax.errorbar(models, estimates, yerr=errors, fmt="none", ecolor="black", capsize=4)
    low = min(iv.low for iv in ivs)
    high = max(iv.high for iv in ivs)
    if title.endswith("(lower is better)"):
        # Bits-per-byte differences are a few percent: start the axis near the data.
        pad = max(high - low, 0.01 * high) * 0.5
        ax.set_ylim(max(low - pad, 0.0), high + pad)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


# --- HTML sections ---------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _summary(report: dict[str, Any], confidence: float, samples: int) -> str:
    failed = [g["name"] for g in report["gates"] if not g["passed"]]
    if report["passed"]:
        verdict = '<span class="verdict-pass">PROMOTE: every gate passed</span>'
    else:
        verdict = (
            '<span class="verdict-fail">NOT PROMOTED: failed '
            + _esc(", ".join(failed) or "no gate was decided")
            + "</span>"
        )
    reference = report.get("reference", "champion" if "champion" in report["scores"] else "base")
    if reference == "champion":
        against = f"the champion (version {_esc(report.get('champion_version') or '?')})"
    else:
        against = "the base model (no model holds the champion alias yet)"
    return (
        "<h1>Evaluation report</h1>\n"
        f"<p>Decision: {verdict}</p>\n"
        f"<p>The candidate is gated against {against}. Each gate is decided on a "
        f"{confidence:.0%} paired bootstrap interval ({samples} resamples over the same held-out "
        "documents or examples for both models), not on the point estimate.</p>"
    )


def _gate_section(report: dict[str, Any]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "gate",
            "metric",
            "result",
            "estimate",
            "interval",
            "threshold",
            "margin",
            "detail",
        )
    )
    rows = []
    for g in report["gates"]:
        result = "pass" if g["passed"] else "FAIL"
        rows.append(
            f'<tr class="{"pass" if g["passed"] else "fail"}"><td>{_esc(g["name"])}</td>'
            f"<td>{_esc(g['metric'])}</td><td><b>{result}</b></td>"
            f'<td class="num">{g["estimate"]:+.4f}</td>'
            f'<td class="num">[{g["low"]:+.4f}, {g["high"]:+.4f}]</td>'
            f'<td class="num">{g["threshold"]:+.4f}</td><td class="num">{g["margin"]:+.4f}</td>'
            f"<td>{_esc(g['detail'])}</td></tr>"
        )
    for s in report.get("skipped", []):
        rows.append(
            f'<tr class="skip"><td>{_esc(s["name"])}</td><td>{_esc(s["metric"])}</td>'
            f'<td>skipped</td><td colspan="4"></td><td>{_esc(s["detail"])}</td></tr>'
        )
    return (
        "<h2>Gates</h2>\n<p>Margin: distance of the deciding interval end from the threshold; "
        "positive is on the passing side.</p>\n"
        f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"
    )


def _figure_section(title: str, image: str | None, missing: str) -> str:
    body = f'<img src="{_esc(image)}" alt="{_esc(title)}">' if image else f"<p>{_esc(missing)}</p>"
    return f"<h2>{_esc(title)}</h2>\n{body}"


def _score_table(intervals: Intervals, models: list[str], confidence: float) -> str:
    labels = BPB_METRICS | INSTRUCTION_METRICS
    head = "<th>metric</th>" + "".join(f"<th>{_esc(m)}</th>" for m in models)
    rows = []
    for metric, per_model in intervals.items():
        cells = "".join(
            f'<td class="num">{iv.estimate:.4f} [{iv.low:.4f}, {iv.high:.4f}] n={iv.n}</td>'
            if (iv := per_model.get(m)) is not None
            else '<td class="num">&mdash;</td>'
            for m in models
        )
        rows.append(f"<tr><td>{_esc(labels[metric])}</td>{cells}</tr>")
    return (
        f"<h2>Scores per model</h2>\n<p>Estimate with each model's own {confidence:.0%} "
        "bootstrap interval over its documents or examples (also the error bars above). These "
        "include the spread between documents that every model shares; the gates compare models "
        "on the same documents (paired), so their intervals are narrower.</p>\n"
        f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"
    )


def _samples_section(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return "<h2>Generated answers</h2>\n<p>no answers were generated</p>"
    columns = ["prompt", "reference", "candidate"]
    if any(s.get("champion") is not None for s in samples):
        columns.append("champion")  # no column of dashes for the first model ever promoted
    head = "".join(f"<th>{c}</th>" for c in columns)
    rows = [
        "<tr>"
        + "".join(
            f"<td><pre>{_esc(s[c])}</pre></td>" if s.get(c) is not None else "<td>&mdash;</td>"
            for c in columns
        )
        + "</tr>"
        for s in samples
    ]
    return (
        "<h2>Generated answers</h2>\n<p>Held-out prompts answered by the candidate and the "
        "champion (greedy decoding), next to the reference answer.</p>\n"
        f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"
    )
