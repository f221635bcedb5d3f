__version__ = "0.1.0"  # pyproject.toml says the same (tests/test_packaging.py)
