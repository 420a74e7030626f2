"""jaxalign: align language models with preferences and rewards, in JAX."""

__version__ = "0.1.0"
