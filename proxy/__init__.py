"""A zero-downtime reverse proxy on trio whose hot upgrade hands over every in-flight connection."""

__version__ = "0.1.0"
