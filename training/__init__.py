"""Offline training, selection, evaluation and export of CDPAE bundles."""
