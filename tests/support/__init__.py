"""Helpers shared by tests and scripts."""
