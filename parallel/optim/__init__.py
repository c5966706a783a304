"""Optimizers from the config and learning-rate schedules."""
