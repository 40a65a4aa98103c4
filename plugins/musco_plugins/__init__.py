"""The plugins bundled with musco-core; they register through the same hooks as third-party plugins."""
