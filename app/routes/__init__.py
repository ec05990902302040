"""Thin routers, one per resource: search, gallery, health."""
