"""reportgen: static HTML reports of how Vision Transformers attend to images."""

__version__ = "0.1.0"
