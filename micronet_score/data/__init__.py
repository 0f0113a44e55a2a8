"""Datasets read from paths the user gives (never downloaded)."""
