"""The run report's reward-model section, from the ``rm_eval/`` results (``orchestration.rm_eval``):
each evaluation set's numbers as table rows, and one calibration plot of them all. The page
itself (HTML, escaping, number format) is ``orchestration.report``'s.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure  # used without pyplot, as in orchestration.report

# (key in the metrics, row label), in the table's order.
RM_ROWS = (
    ("accuracy", "accuracy (share of pairs ranked right, a tie half)"),
    ("pairs", "pairs"),
    ("longer_preferred", "longer preferred (pairs of different lengths: share the longer wins)"),
    ("length_correlation", "length correlation (Pearson r of score and length)"),
    ("ece", "ECE (expected calibration error of sigmoid(r_w - r_l))"),
)
BUCKET_HEAD = ("length difference (tokens)", "pairs", "accuracy", "longer preferred")
CALIBRATION = "Reward model calibration"
CALIBRATION_CAPTION = (
    "observed share preferred against the predicted p = sigmoid(r_w - r_l), over both "
    "orientations of every pair (so it mirrors about 0.5), per evaluation set; dashed: "
    "perfect calibration"
)


def rm_rows(metrics: dict) -> list[tuple[str, Any]]:
    """(label, value) per ``RM_ROWS`` entry; a value the file lacks is None."""
    return [(label, metrics.get(key)) for key, label in RM_ROWS]


def rm_bucket_rows(metrics: dict) -> list[list[Any]]:
    """One row per length-difference bucket, in ``BUCKET_HEAD``'s columns."""
    keys = ("bucket", "pairs", "accuracy", "longer_preferred")
    return [[bucket.get(k) for k in keys] for bucket in metrics.get("buckets") or []]


def calibration_figure(evals: dict[str, dict]) -> tuple[str, str, Figure] | None:
    """(title, caption, figure): a reliability line per evaluation set over the diagonal; None
    when no set has calibration bins."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfectly calibrated")
    drawn = False
    for name, metrics in evals.items():
        bins = metrics.get("calibration") or []
        if not bins:
            continue
        ece = metrics.get("ece")
        label = f"{name} (ECE {ece:.3g})" if isinstance(ece, (int, float)) else name
        x, y = [b["predicted"] for b in bins], [b["observed"] for b in bins]
        ax.plot(x, y, marker="o", label=label)
        drawn = True
    if not drawn:
        return None
    ax.set(title=CALIBRATION, xlabel="predicted p (chosen preferred)", ylabel="observed")
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return CALIBRATION, CALIBRATION_CAPTION, fig
