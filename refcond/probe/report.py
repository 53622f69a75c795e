"""The probe's report: a Markdown table of accuracies and paired differences, and a matplotlib plot.

Both are made from the results dictionary :func:`refcond.probe.run_probe` writes as JSON, so they can
be redrawn from ``results.json`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refcond.errors import ConfigError
from refcond.files import atomic_write
from refcond.probe.render import NUM_CLASSES


def _interval(estimate: dict[str, float], signed: bool = False) -> str:
    value = f"{estimate['value']:+.1f}" if signed else f"{estimate['value']:.1f}"
    low, high = (f"{estimate[k]:+.1f}" if signed else f"{estimate[k]:.1f}" for k in ("low", "high"))
    return f"{value} [{low}, {high}]"


def markdown(results: dict[str, Any]) -> str:
    """Two tables: accuracy per variant and method (mean over seeds, 95 % CI, each seed), then paired differences."""
    settings = results["settings"]
    labels = settings["labels"]
    encoder_line = "".join(
        f" {variant}: encoder pretrained on {labels.get(variant, settings['encoder']['labels'])}"
        + ("." if facts.get("accuracy") is None else f" (exact-set accuracy {100 * facts['accuracy']:.1f} %).")
        for variant, facts in results["encoders"].items()
    )
    lines = [
        "# Aggregation probe",
        "",
        f"Accuracy (%) at naming each group's consistent element, on {settings['eval_groups']} evaluation groups, "
        f"mean of {len(settings['seeds'])} training seed{'s' if len(settings['seeds']) > 1 else ''} with a 95 % bootstrap interval over groups; "
        f"chance is {100 / NUM_CLASSES:.1f} %.{encoder_line}",
        "",
        "| variant | method | trained parameters | accuracy % [95 % CI] | per seed | seconds per run |",
        "| --- | --- | ---: | --- | --- | ---: |",
    ]
    for row in results["accuracy"]:
        seeds = ", ".join(f"{value:.1f}" for value in row["per_seed"].values())
        lines.append(
            f"| {row['variant']} | {row['method']} | {row['parameters']:,} | {_interval(row['accuracy'])} | {seeds} | {row['seconds']:.1f} |"
        )
    lines += ["", "Paired differences (percentage points, same groups, mean of the seeds):", "", "| variant | difference | points [95 % CI] |", "| --- | --- | --- |"]
    for row in results["differences"]:
        lines.append(f"| {row['variant']} | {row['a']} - {row['b']} | {_interval(row['difference'], signed=True)} |")
    if results.get("failures"):
        lines += ["", "Methods that could not run:", ""]
        lines += [f"- {f['variant']} / {f['method']} (seed {f['seed']}): {f['error']}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Accuracy per method, one panel per variant: the mean with its 95 % CI as a bar, each seed as a dot.

    Needs matplotlib (a dependency of refcond); raises :class:`ConfigError` without it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the probe's plot needs matplotlib: pip install matplotlib (or pass --no-plot).") from None
    variants = list(dict.fromkeys(row["variant"] for row in results["accuracy"]))
    methods = max(sum(row["variant"] == variant for row in results["accuracy"]) for variant in variants)
    figure, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 1.4 + 0.45 * methods), squeeze=False, sharex=True)
    for axis, variant in zip(axes[0], variants):
        rows = [row for row in results["accuracy"] if row["variant"] == variant]
        labels = [row["method"] for row in rows]
        values = [row["accuracy"]["value"] for row in rows]
        errors = [[v - row["accuracy"]["low"] for v, row in zip(values, rows)], [row["accuracy"]["high"] - v for v, row in zip(values, rows)]]
        positions = range(len(rows))
        axis.barh(positions, values, xerr=errors, color="#8fb3d9", edgecolor="#2d5f8a", capsize=3)
        for y, row in zip(positions, rows):
            seeds = list(row["per_seed"].values())
            axis.scatter(seeds, [y] * len(seeds), s=10, color="black", zorder=3)
        axis.axvline(100 / NUM_CLASSES, color="grey", linestyle=":", linewidth=1)
        axis.set_yticks(list(positions), labels)
        axis.invert_yaxis()
        axis.set_xlim(0, 100)
        axis.set_xlabel("accuracy %")
        axis.set_title(variant)
    figure.suptitle("bar: mean of the seeds with its 95 % CI; dots: each seed; dotted line: chance", fontsize=9)
    figure.tight_layout()
    target = Path(path)
    atomic_write(target, lambda tmp: figure.savefig(tmp, dpi=120, format=target.suffix.lstrip(".") or "png"))
    plt.close(figure)
    return target
