"""``ircan demo``: the served comparison, one table per setting (run.py asks, report.py tabulates)."""

from .report import print_demo, summarize_set, summarize_setting
from .run import METHODS, SETTINGS, DemoRow, DemoSet, build_settings, demo_setting, held_out_questions, run_demo

__all__ = ["METHODS", "SETTINGS", "DemoRow", "DemoSet", "build_settings", "demo_setting", "held_out_questions",
           "print_demo", "run_demo", "summarize_set", "summarize_setting"]
