"""Training loop, schedules, checkpoints and logging."""
