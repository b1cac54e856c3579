"""Evaluation: cross-validation splits and metrics."""
