"""The runner side: the `kronpeft` command, the training loop, tasks and metrics, baselines, the study
and its report. Never imported by the library (tests/test_layering.py)."""
