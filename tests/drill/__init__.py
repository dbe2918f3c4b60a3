"""The fault drill's case library, one module per kind of fault, with its harness (``common``).

It is a test harness, so it lives with the tests: ``python -m tests.drill`` (from the repository
root) runs it, ``tools/fault_drill.py`` is the user-facing command that does so, and
``tests/test_fault_drill.py`` runs the fast subset. Each module exposes ``CASES``: a list of
:class:`tests.drill.common.Case`.
"""
