"""edge-agent: verified, encrypted model delivery and local inference on edge devices."""

__version__ = "0.1.0"

__all__ = ["__version__"]
