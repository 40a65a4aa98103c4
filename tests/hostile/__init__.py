"""Hostile inputs for musco-core: case definitions (``cases``) and the subprocess that runs them (``runner``)."""
