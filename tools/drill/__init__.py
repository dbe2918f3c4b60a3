"""Fault-drill cases, one module per kind of fault; ``tools/fault_drill.py`` runs them.

Each module exposes ``CASES``: a list of :class:`drill.common.Case`.
"""
