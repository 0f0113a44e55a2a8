"""Readers of the challenge data sets (from paths the user gives; nothing is downloaded)."""
