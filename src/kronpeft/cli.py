"""Deprecated re-export of `kronpeft.runner.cli`, kept for one release (CHANGELOG.md): the `kronpeft` console
script of installs made before the move calls kronpeft.cli:main. Import `kronpeft.runner.cli` instead."""
from .runner.cli import main  # noqa: F401
