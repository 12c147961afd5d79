"""The distribution's version: one place, read by pyproject and sent in the User-Agent."""

__version__ = "0.1.0"
