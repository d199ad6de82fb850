"""The parity gate: a variant derived from another (an ONNX export of an XGBoost model) must
answer like its source before it takes any traffic.

Both models see the same rows, cast to float32 first (what an ONNX model consumes); class
probabilities must agree within ``rtol``/``atol`` and labels must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_deploy.errors import ParityError
from ray_deploy.models.predictors import build_predictor

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-6
GENERATED_ROWS = 256


@dataclass(frozen=True)
class ParityReport:
    """How a derived variant compares with its source on a sample."""

    source: str
    derived: str
    rows: int
    compared: str
    max_abs_diff: float
    label_mismatches: int
    worst: list[dict[str, Any]] = field(default_factory=list)
    sample: str = ""

    @property
    def ok(self) -> bool:
        return not self.worst and self.label_mismatches == 0

    def summary(self) -> str:
        verdict = "passes" if self.ok else "FAILS"
        text = (
            f"parity of {self.derived!r} against {self.source!r} {verdict} on {self.rows} rows ({self.sample}): "
            f"max |diff| of {self.compared} {self.max_abs_diff:.3g}, {self.label_mismatches} label mismatch(es)"
        )
        if self.worst:
            shown = "; ".join(
                f"row {w['row']}: {w['source']} vs {w['derived']} (diff {w['diff']:.3g})" for w in self.worst[:5]
            )
            text += f"; worst rows: {shown}"
        return text


def sample_rows(
    n_features: int, rows: Any = None, count: int = GENERATED_ROWS, seed: int = 0
) -> tuple[np.ndarray, str]:
    """The declared held-out rows, else generated standard-normal rows; always float32 values."""
    if rows is not None:
        array = np.asarray(rows, dtype=np.float64)
        return array.astype(np.float32).astype(np.float64), f"{len(array)} declared rows"
    generated = np.random.default_rng(seed).normal(size=(count, n_features))
    return generated.astype(np.float32).astype(np.float64), f"{count} generated rows"


def _outputs(name: str, model: Any, config: dict[str, Any], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    labels = np.asarray(build_predictor(name, model, {**config, "output": "label"}).predict(rows))
    try:
        probabilities = np.asarray(build_predictor(name, model, {**config, "output": "probability"}).predict(rows))
    except Exception:
        probabilities = None
    return labels.reshape(len(rows), -1), probabilities


def check_parity(
    source: tuple[str, str, Any, dict[str, Any]],
    derived: tuple[str, str, Any, dict[str, Any]],
    rows: Any = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> ParityReport:
    """Compare a derived variant with its source.

    Args:
        source, derived: (variant name, predictor name, model object, predictor_config).
        rows: held-out rows (2-D); generated when None.

    Returns:
        A ``ParityReport``; ``report.ok`` says whether the derived variant may take traffic.
    """
    source_name, source_predictor, source_model, source_config = source
    derived_name, derived_predictor, derived_model, derived_config = derived
    probe = build_predictor(source_predictor, source_model, source_config)
    n_features = getattr(probe, "n_features", None)
    if rows is None and not n_features:
        raise ParityError(f"parity: {source_name!r} does not say how many features it takes; declare parity_rows")
    sample, description = sample_rows(n_features or 0, rows)
    source_labels, source_probabilities = _outputs(source_predictor, source_model, source_config, sample)
    derived_labels, derived_probabilities = _outputs(derived_predictor, derived_model, derived_config, sample)
    label_mismatches = int(np.sum(np.any(source_labels != derived_labels.astype(source_labels.dtype), axis=1)))
    if source_probabilities is not None and derived_probabilities is not None:
        expected, actual, compared = (
            source_probabilities,
            derived_probabilities.reshape(source_probabilities.shape),
            "probabilities",
        )
    else:
        expected, actual, compared = source_labels.astype(float), derived_labels.astype(float), "labels"
    expected = expected.reshape(len(sample), -1)
    actual = actual.reshape(len(sample), -1)
    diff = np.abs(expected - actual)
    bad = np.any(diff > atol + rtol * np.abs(expected), axis=1) | np.any(
        source_labels != derived_labels.astype(source_labels.dtype), axis=1
    )
    order = np.argsort(-diff.max(axis=1))
    worst = [
        {
            "row": int(i),
            "source": [round(float(v), 7) for v in expected[i]],
            "derived": [round(float(v), 7) for v in actual[i]],
            "diff": float(diff[i].max()),
        }
        for i in order
        if bad[i]
    ][:10]
    return ParityReport(
        source=source_name,
        derived=derived_name,
        rows=len(sample),
        compared=compared,
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        label_mismatches=label_mismatches,
        worst=worst,
        sample=description,
    )
