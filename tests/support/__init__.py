"""Test support: helpers the tests share (fakes, harnesses, helper processes, plugins named by spec).

Nothing here is part of the library; ``tests/conftest.py`` makes it importable.
"""
