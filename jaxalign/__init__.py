"""jaxalign: align language models with preferences and rewards, in JAX."""

__version__ = "0.1.0"

from jaxalign.host import enforce_offline as _enforce_offline  # noqa: E402

_enforce_offline()  # before anything imports transformers: local files only
