"""Bundled model architectures, installed as ``micronet_score.models`` and registered by name."""
