"""Migrator: applies placement plans to expert hosts, make-before-break, through the weights object store."""
