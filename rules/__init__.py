"""Bundled rule sets (TOML files), installed as package data of ``micronet_score.rules``."""
