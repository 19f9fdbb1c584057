"""The package version, in a module of its own so that nothing inside moesim imports the top-level face."""
__version__ = "0.1.0"
