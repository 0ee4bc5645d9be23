"""Human-readable output: the quantization table, results table, report.md and plots."""
from qatkit.report.report import write_report
from qatkit.report.tables import describe, results_table

__all__ = ["describe", "results_table", "write_report"]
