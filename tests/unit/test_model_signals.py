"""Gates on the model's answers (disagreement, prediction shift, quality from labels), the
per-label scoring replicas do, and the capture options, with plain numbers: stats recorded the
way replicas record them, merged over two replicas by a collector, then judged."""

import math

import pytest

from ray_deploy.control.rollout import judge
from ray_deploy.errors import SpecError
from ray_deploy.models.predictors.base import RequestError
from ray_deploy.serving.metrics import StatsCollector, VariantStats, same_answer
from ray_deploy.serving.server import quality_scorer, request_score
from ray_deploy.spec import DeploymentSpec, RolloutSpec


def merged(*replicas: VariantStats) -> VariantStats:
    collector = StatsCollector()
    for index, stats in enumerate(replicas):
        collector.report("app", f"replica-{index}", {"x@v2": stats.to_dict()})
    return VariantStats.from_dict(collector.snapshot("app")["x@v2"])


def release(predictions: list[float], compared: list[tuple] = (), labels: list[float] = ()) -> VariantStats:
    """A release's stats over two replicas: one request per prediction (3 ms, 200), the answers it
    was compared on (answer, the old release's), the scores of its labels."""
    replicas = [VariantStats(), VariantStats()]
    for index, value in enumerate(predictions):
        replicas[index % 2].record(3.0, 200, [value])
    for index, (mine, old) in enumerate(compared):
        replicas[index % 2].compare_reference([mine], [old])
    for index, score in enumerate(labels):
        replicas[index % 2].record_label(score)
    return merged(*replicas)


def policy(**fields) -> RolloutSpec:
    return RolloutSpec(strategy="canary", steps=[25, 100], interval_s=4, **fields)


OLD = release([0.0, 1.0] * 50, labels=[1.0] * 45 + [0.0] * 5)  # mean 0.5, std 0.5, accuracy 0.9


def test_disagreement_gate_fails_a_release_that_answers_otherwise_and_names_both_numbers():
    wrong = release([1.0] * 40, compared=[(1, 0)] * 10 + [(1, 1)] * 30)
    verdict = judge(policy(max_disagreement=0.2), 25, wrong, OLD)
    assert not verdict.passed
    assert "disagreement 0.250" in verdict.reason and "10/40" in verdict.reason
    assert "max_disagreement=0.2" in verdict.reason
    assert verdict.canary["disagreement"] == pytest.approx(0.25) and verdict.canary["compared"] == 40


def test_disagreement_gate_passes_equal_answers_within_float_noise():
    same = release([0.5] * 40, compared=[(0.30000001, 0.3)] * 40)
    verdict = judge(policy(max_disagreement=0.0), 25, same, OLD)
    assert verdict.passed, verdict.reason
    assert "disagreement 0.000" in verdict.reason


def test_disagreement_gate_without_comparisons_cannot_pass():
    verdict = judge(policy(max_disagreement=0.5), 25, release([1.0] * 10), OLD)
    assert not verdict.passed and "could be compared" in verdict.reason


def test_no_model_gate_set_judges_as_before():
    assert judge(policy(), 25, release([1.0] * 10), OLD).passed


def test_shift_gate_compares_means_in_the_old_releases_standard_deviations():
    shifted = release([1.0] * 40)  # mean 1.0 against 0.5 +- 0.5: one standard deviation
    failed = judge(policy(max_prediction_shift=0.5), 25, shifted, OLD)
    assert not failed.passed
    assert "prediction shift 1" in failed.reason and "max_prediction_shift=0.5" in failed.reason
    assert "mean 1 against the old release's 0.5" in failed.reason
    assert judge(policy(max_prediction_shift=1.5), 25, shifted, OLD).passed
    assert failed.baseline["prediction_std"] == pytest.approx(0.5)


def test_shift_gate_against_constant_old_predictions():
    constant = release([2.0] * 20)
    assert judge(policy(max_prediction_shift=0.1), 25, release([2.0] * 10), constant).passed
    moved = judge(policy(max_prediction_shift=0.1), 25, release([2.5] * 10), constant)
    assert not moved.passed and "inf" in moved.reason


def test_shift_gate_needs_numeric_predictions():
    text = VariantStats()
    text.record(3.0, 200, ["cat"])
    verdict = judge(policy(max_prediction_shift=1.0), 25, text, OLD)
    assert not verdict.passed and "no numeric predictions" in verdict.reason


def test_quality_gate_higher_is_better():
    worse = release([1.0] * 40, labels=[1.0] * 16 + [0.0] * 4)  # accuracy 0.8 against 0.9
    failed = judge(policy(min_quality_delta=-0.05, min_labels=20), 25, worse, OLD)
    assert not failed.passed
    assert "quality 0.8 against the old release's 0.9" in failed.reason and "higher is better" in failed.reason
    assert "min_quality_delta=-0.05" in failed.reason
    assert judge(policy(min_quality_delta=-0.15, min_labels=20), 25, worse, OLD).passed


def test_quality_gate_lower_is_better_for_errors():
    old = release([1.0] * 20, labels=[0.5] * 20)  # MAE 0.5
    better = release([1.0] * 20, labels=[0.2] * 20)  # MAE 0.2
    assert judge(policy(min_quality_delta=0.1, min_labels=20), 25, better, old, goal="min").passed
    failed = judge(policy(min_quality_delta=0.1, min_labels=20), 25, old, better, goal="min")
    assert not failed.passed and "lower is better" in failed.reason


def test_quality_gate_waits_for_enough_labels():
    few = release([1.0] * 40, labels=[1.0] * 5)
    verdict = judge(policy(min_quality_delta=0.0, min_labels=20), 25, few, OLD)
    assert not verdict.passed and "labels for the new release 5, for the old 50" in verdict.reason


def test_an_open_window_is_not_judged_on_model_signals():
    wrong = release([1.0] * 40, compared=[(1, 0)] * 40)
    assert judge(policy(max_disagreement=0.1), 25, wrong, OLD, final=False).passed


def test_stats_merge_and_subtract_every_new_field():
    one, two = VariantStats(), VariantStats()
    one.record(1.0, 200, [2.0])
    one.compare_reference([1], [0])
    one.record_label(1.0)
    one.captured, one.capture_dropped = 3, 1
    two.record(1.0, 200, [4.0])
    two.compare_reference([1], [1])
    both = one.merge(two)
    assert (both.reference_compared, both.reference_agreed, both.labeled, both.captured) == (2, 1, 1, 3)
    assert both.prediction_std == pytest.approx(1.0) and both.disagreement == pytest.approx(0.5)
    assert both.minus(two) == one
    # Stats pushed by a replica of an older version (fewer fields) still merge.
    assert VariantStats.from_dict({"requests": 2}).merge(one).requests == 3


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ([1, 0], [1, 0], True),
        ([0.1 + 0.2], [0.3], True),
        ([[0.2, 0.8]], [[0.2000000001, 0.8]], True),
        ([1], [2], False),
        ([1, 0], [1], False),
        (["cat"], ["dog"], False),
        ([True], [1.0000001], False),
    ],
)
def test_same_answer(one, other, same):
    assert same_answer(one, other) is same


def test_accuracy_scores_classes_and_class_probabilities():
    accuracy = quality_scorer("accuracy")
    assert request_score(accuracy, [1], 1) == 1.0
    assert request_score(accuracy, [[0.1, 0.9]], 1) == 1.0  # the most likely class
    assert request_score(accuracy, [[0.7, 0.3]], 1) == 0.0
    assert request_score(accuracy, ["cat", "dog"], ["cat", "cat"]) == 0.5
    with pytest.raises(RequestError, match="2 rows"):
        request_score(accuracy, [1, 1], 1)
    with pytest.raises(RequestError, match="lists 3 values but the request had 2 rows"):
        request_score(accuracy, [1, 1], [1, 1, 1])


def test_mae_scores_absolute_errors_and_refuses_what_is_not_a_number():
    mae = quality_scorer("mae")
    assert request_score(mae, [2.5], 2.0) == pytest.approx(0.5)
    assert request_score(mae, [1.0, 3.0], [2.0, 2.0]) == pytest.approx(1.0)
    with pytest.raises(RequestError, match="not a finite number"):
        request_score(mae, [1.0], "high")
    with pytest.raises(RequestError, match="not a finite number"):
        request_score(mae, [1.0], math.inf)


def test_a_user_metric_is_imported_by_name():
    scorer = quality_scorer("operator:sub")  # (prediction, label) -> prediction - label
    assert request_score(scorer, [5], 3) == 2.0


@pytest.mark.parametrize(
    ("capture", "message"),
    [
        ({"sample": 0}, "capture.sample: Input should be greater than 0"),
        ({"sample": 1.5}, "capture.sample: Input should be less than or equal to 1"),
        ({"path": "relative/dir"}, "capture.path: path 'relative/dir' must be an absolute directory"),
        ({"quality": "f1"}, "capture.quality: quality 'f1' must be accuracy or mae, or 'module:function'"),
        ({"quality_goal": "up"}, "capture.quality_goal: quality_goal 'up' is not one of max, min"),
        ({"feedback_token_env": "s3cr3t value"}, "must be the NAME of an environment variable"),
        ({"flush": 1}, "capture.flush: unknown option"),
    ],
)
def test_bad_capture_options_name_the_field(capture, message):
    with pytest.raises(SpecError, match="") as raised:
        DeploymentSpec.from_options({"app": "a", "model": "m", "capture": capture})
    assert message in str(raised.value)


def test_capture_options_and_their_defaults():
    spec = DeploymentSpec.from_options({"app": "a", "model": "m", "capture": '{"sample": 0.25, "quality": "mae"}'})
    assert spec.capture.sample == 0.25 and spec.capture.goal == "min" and spec.capture.flush_s == 5.0
    assert DeploymentSpec.from_options({"app": "a", "model": "m", "capture": True}).capture.sample == 0.1
    assert DeploymentSpec.from_options({"app": "a", "model": "m"}).capture is None


def test_a_quality_gate_without_capture_is_refused():
    with pytest.raises(SpecError, match="min_quality_delta needs labels"):
        DeploymentSpec.from_options({"app": "a", "model": "m", "rollout": {"min_quality_delta": 0.0}})


def test_captures_go_beside_the_flows_artifacts_unless_a_path_says_otherwise(tmp_path, monkeypatch):
    from ray_deploy.models.artifacts import ModelRef
    from ray_deploy.serving.config import capture_config
    from ray_deploy.spec import CaptureSpec

    flow = ModelRef(kind="metaflow", uri="metaflow://F/1/s/2/model", datastore_root="s3://bucket/metaflow")
    mlflow = ModelRef(kind="mlflow", uri="models:/m/1")
    assert capture_config(CaptureSpec(), {"a": flow}).root == "s3://bucket/metaflow/ray_deploy_captures"
    assert capture_config(CaptureSpec(path="/data/captures/"), {"a": flow}).root == "/data/captures"
    monkeypatch.setenv("RAY_DEPLOY_HOME", str(tmp_path))
    assert capture_config(CaptureSpec(), {"a": mlflow}).root == str(tmp_path / "captures")


def test_a_quality_function_that_cannot_be_imported_names_the_option(tmp_path):
    from ray_deploy.serving.capture import load_quality_function

    with pytest.raises(SpecError, match=r"capture.quality: cannot import module 'no_such_module'"):
        load_quality_function("no_such_module:score")
    (tmp_path / "my_metrics.py").write_text("def score(prediction, label):\n    return float(prediction == label)\n")
    with pytest.raises(SpecError, match=r"capture.quality: module 'my_metrics' has no function 'f1'"):
        load_quality_function("my_metrics:f1", code_dir=str(tmp_path))
    assert load_quality_function("my_metrics:score", code_dir=str(tmp_path))(1, 1) == 1.0
