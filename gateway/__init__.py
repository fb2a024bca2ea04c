"""Ingestion gateway: SDK authentication in front of a mobile-analytics tracking API."""

__version__ = "0.1.0"
