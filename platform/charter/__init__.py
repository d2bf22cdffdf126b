"""Charter: sovereign-AI governance platform."""

__version__ = "0.1.0"
