"""The package version, recorded with every score file and pruned model."""

__version__ = "0.2.0"
