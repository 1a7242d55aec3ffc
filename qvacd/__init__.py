"""qvacd: peer-to-peer delegated inference daemon."""

__version__ = "0.1.0"
