"""CDPAE cross-modal retrieval service (no torch in this package)."""
