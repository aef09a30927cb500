"""Training, evaluation, metrics, distributed helpers and checkpoints."""
