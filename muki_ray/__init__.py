"""muki-ray: MUKI knowledge integration of text classifiers on Ray."""

__version__ = "0.1.0"
