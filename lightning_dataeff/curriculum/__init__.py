"""Curriculum learning: sequence-length transforms, the data analyzer and the difficulty-aware sampler."""

from lightning_dataeff.curriculum.analysis import AnalysisError, MetricAnalysis, load_analysis
from lightning_dataeff.curriculum.analyzer import analyze, merge_analysis
from lightning_dataeff.curriculum.sampler import CurriculumDataLoader, CurriculumSampler, MetricRule, parse_metric_rules
from lightning_dataeff.curriculum.seqlen import batch_sequence_length, set_batch_sequence_length
from lightning_dataeff.curriculum.sources import FlatTokens

__all__ = [
    "set_batch_sequence_length",
    "batch_sequence_length",
    "analyze",
    "merge_analysis",
    "load_analysis",
    "MetricAnalysis",
    "AnalysisError",
    "FlatTokens",
    "CurriculumSampler",
    "CurriculumDataLoader",
    "MetricRule",
    "parse_metric_rules",
]
