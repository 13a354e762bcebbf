"""Benchmark evaluation (GSM8K, CRUXEval-O) and teacher-relative metrics for models and RAD hybrids."""

from rad.evaluate.extract import extract_cruxeval_prediction, extract_final_number, numbers_equal
from rad.evaluate.runner import (
    EvalConfig,
    EvalResults,
    ModelResult,
    TaskMeta,
    TaskResult,
    TaskScore,
    TeacherScores,
    comparison_table,
    evaluate_model,
    evaluate_models,
    paired_test,
)
from rad.evaluate.sandbox import SandboxLimits, SandboxResult, check_output_prediction
from rad.evaluate.stats import McNemarResult, mcnemar_exact, mcnemar_items, pair_outcomes, wilson_interval
from rad.evaluate.teacher import TeacherConfig, teacher_metrics

__all__ = [
    "EvalConfig",
    "EvalResults",
    "McNemarResult",
    "ModelResult",
    "SandboxLimits",
    "SandboxResult",
    "TaskMeta",
    "TaskResult",
    "TaskScore",
    "TeacherScores",
    "TeacherConfig",
    "check_output_prediction",
    "comparison_table",
    "evaluate_model",
    "evaluate_models",
    "extract_cruxeval_prediction",
    "extract_final_number",
    "mcnemar_exact",
    "mcnemar_items",
    "numbers_equal",
    "pair_outcomes",
    "paired_test",
    "teacher_metrics",
    "wilson_interval",
]
