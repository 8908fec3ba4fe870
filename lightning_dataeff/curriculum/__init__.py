"""Curriculum learning: sequence-length transforms, the data analyzer and the difficulty-aware sampler."""

from lightning_dataeff.curriculum.analyzer import MetricAnalysis, analyze, load_analysis, merge_analysis
from lightning_dataeff.curriculum.seqlen import set_batch_sequence_length

__all__ = [
    "set_batch_sequence_length",
    "analyze",
    "merge_analysis",
    "load_analysis",
    "MetricAnalysis",
    "CurriculumSampler",
]


def __getattr__(name: str):
    if name == "CurriculumSampler":
        from lightning_dataeff.curriculum.sampler import CurriculumSampler

        return CurriculumSampler
    raise AttributeError(f"module 'lightning_dataeff.curriculum' has no attribute {name!r}")
