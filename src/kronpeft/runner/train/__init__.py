"""The training loop behind `kronpeft train`: `models` chooses and loads the base model, `batches` encodes,
orders and evaluates, `checkpoints` saves, loads and guards a run's folder, `prepare` holds the steps before
the first training step, and `loop` runs them and the loop itself."""
