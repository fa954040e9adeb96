"""Kiln's client side: the async Python SDK (`kiln.client`) and the `kiln` CLI."""

from kiln.client import KilnClient

__all__ = ["KilnClient"]
