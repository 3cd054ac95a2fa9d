"""Adapters that make other libraries compute their losses with celib.

Each submodule imports its library only when it is imported itself, so
``import celib`` never imports them:

- :mod:`celib.integrations.transformers`: Hugging Face causal language models.
"""

__all__: list[str] = []
