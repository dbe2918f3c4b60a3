"""Small utilities with no model code."""
