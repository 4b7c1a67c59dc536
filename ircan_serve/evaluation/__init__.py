"""Evaluation of context faithfulness: metrics, baselines (CAD, prompts), ablations, tuning, reports."""
