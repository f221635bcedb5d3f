"""Moved to rtlynx.testing (public, for trying the commands on a CPU); kept for the tests that import it here."""

from rtlynx.testing import PROMPTS, SIZE, save_tiny_pipeline  # noqa: F401
