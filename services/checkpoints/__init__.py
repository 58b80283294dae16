"""Offline builders of real pretrained checkpoints (no model hub needed)."""
