"""The version of foundry, recorded in every checkpoint it writes."""

__version__ = "0.1.0"
