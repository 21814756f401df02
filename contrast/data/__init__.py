"""Data: sources as Hugging Face datasets, the built-in synthetic set, transforms and collation."""

from contrast.data.sources import DataError, load_source

__all__ = ["load_source", "DataError"]
