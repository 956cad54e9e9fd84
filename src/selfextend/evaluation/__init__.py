"""Evaluation: long-context tasks, the methods compared, a resumable runner, summaries and plots."""

from .methods import EVAL_METHODS, Method, applied
from .report import format_table, nll_by_position, plot, summarize, write_csv
from .runner import PERPLEXITY, Evaluation, evaluate, load_rows
from .tasks import TASKS, Sample, is_correct

__all__ = ["EVAL_METHODS", "PERPLEXITY", "TASKS", "Evaluation", "Method", "Sample", "applied", "evaluate",
           "format_table", "is_correct", "load_rows", "nll_by_position", "plot", "summarize", "write_csv"]
