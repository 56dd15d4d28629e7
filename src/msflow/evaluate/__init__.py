"""Metrics, decision thresholds and the reports written into a run folder."""
