"""foundry: define, train, specialise, evaluate and serve large language models."""

__version__ = "0.1.0"
