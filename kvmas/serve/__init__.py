"""An OpenAI-compatible server over the primitives (``kvmas serve``; needs the ``serve`` extra).

>>> from kvmas.serve import ServeConfig
>>> ServeConfig().max_batch
32
"""

from kvmas.serve.app import ServeConfig, create_app
from kvmas.serve.background import BackgroundServer

__all__ = ["ServeConfig", "create_app", "BackgroundServer"]
