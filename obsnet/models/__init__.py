"""Segmentation networks, observers, their shared blocks, the registry and checkpoint files."""
