"""inpo: Iterative Nash Policy Optimization and its peers.

Importing ``inpo`` loads only the standard library; submodules load what they need when they are
imported (``inpo.losses`` and ``inpo.game`` need torch / NumPy / SciPy; language-model code needs
transformers and is imported only by the commands that use it).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
