"""The book's own helpers: small data sets, a plain training loop, plots, metrics and the intro's widget.

They serve the chapters of *Cross-Entropy, Executed* and are not part of celib's
library API: ``import celib`` does not import them, and they need the ``book``
extra (scikit-learn, matplotlib). Import them explicitly:
``from celib.book import data, metrics, plot, train``.
"""
