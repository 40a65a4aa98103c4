"""The version of musco-core, in a module of its own so that any part of the core can read it without a cycle."""
__version__ = "0.1.0"
