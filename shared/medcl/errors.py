"""Errors medcl raises for problems the user can fix (bad data, bad configuration)."""

from __future__ import annotations


class MedclInputError(ValueError):
    """A dataset, file or configuration value is unusable; the message names it and says how to fix it."""
