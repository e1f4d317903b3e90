"""The training loop behind `kronpeft train`."""
