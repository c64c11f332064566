"""Analyses of trained models (``python -m distill_engine.diagnostics --help``)."""
