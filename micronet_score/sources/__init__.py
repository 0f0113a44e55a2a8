"""Where checkpoints come from: one module per kind of source, each reading its files without running code from
them (see README "Safety and robustness")."""
