"""reportgen: static HTML reports of how Vision Transformers attend to images.

Two front doors over one core: ``reportgen build MANIFEST`` on the command line, and in Python
:class:`Explainer` (maps for images in a notebook) and :func:`build` (a site from a manifest).
"""

__version__ = "0.1.0"

__all__ = ["Explainer", "Explanation", "build", "__version__"]


def __getattr__(name: str):
    # Imported on first use: ``import reportgen`` (and the command line's start) stays free of torch.
    if name in ("Explainer", "Explanation", "build"):
        from reportgen import api

        return getattr(api, name)
    raise AttributeError(f"module 'reportgen' has no attribute {name!r}")
