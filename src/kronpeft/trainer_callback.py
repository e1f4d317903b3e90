"""Deprecated re-export of `kronpeft.integrations.trainer`, kept for one release (CHANGELOG.md): the import path
the docs gave before the move. Import `kronpeft.integrations.trainer` instead."""
from .integrations.trainer import KronSaveCallback  # noqa: F401
