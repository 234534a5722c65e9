"""The package's version, at the bottom of the layers: any module may read it without importing the facade above them."""

__version__ = "0.1.0"
