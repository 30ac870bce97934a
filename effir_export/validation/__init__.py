"""Validation harness: embedding fidelity, BEIR retrieval quality, memory and latency per backend,
with pass/fail gates and JSON / JUnit / Markdown / PNG reports. Entry point: :func:`run_validation`."""
from __future__ import annotations

from .config import BenchConfig, LatencyConfig, MemoryConfig, SliceConfig, ValidateConfig
from .report import BenchReport, ValidationReport, write_bench, write_reports
from .run import run_bench, run_validation

__all__ = ["BenchConfig", "BenchReport", "LatencyConfig", "MemoryConfig", "SliceConfig", "ValidateConfig",
           "ValidationReport", "run_bench", "run_validation", "write_bench", "write_reports"]
