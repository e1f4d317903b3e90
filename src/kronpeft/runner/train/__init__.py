"""The training loop behind `kronpeft train`: `models` chooses and loads the base model, `batches` encodes,
orders and evaluates, `checkpoints` saves, loads and guards a run's folder, and `loop` runs the steps."""
