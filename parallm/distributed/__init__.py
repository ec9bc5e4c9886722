"""Parallelism applied to the models from outside: functions and attention backends."""
