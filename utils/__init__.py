"""Shared definitions (modalities, subsets, labels) and, later, losses, schedules and metrics."""
