"""Plateforme's gateway: the request path from an API key to a healthy vLLM replica."""

__version__ = "0.1.0"
