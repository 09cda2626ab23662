"""Drivers that chain the CLI for the thesis tables."""
