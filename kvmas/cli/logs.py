"""Logging for the command line: the ``kvmas`` logger through a rich handler on stderr.

By default kvmas says what it is doing at ``INFO`` and third-party warnings (transformers, torch, Python
``warnings``) are not shown; ``--verbose`` shows kvmas' ``DEBUG`` messages and everyone's warnings.

>>> import logging
>>> setup_logging(verbose=False)
>>> logging.getLogger("kvmas").level == logging.INFO, logging.getLogger("transformers").level == logging.ERROR
(True, True)
"""

from __future__ import annotations

import logging
import os
import warnings

THIRD_PARTY = ("transformers", "torch", "huggingface_hub", "accelerate", "urllib3", "filelock", "httpx",
               "opentelemetry")


def setup_logging(verbose: bool = False) -> None:
    """Route the ``kvmas`` logger to stderr through rich (data shown literally); quiet third parties."""
    from rich.logging import RichHandler

    from kvmas.cli.render import console

    log = logging.getLogger("kvmas")
    for handler in [h for h in log.handlers if getattr(h, "_kvmas_cli", False)]:
        log.removeHandler(handler)
    handler = RichHandler(console=console(stderr=True), show_path=verbose, show_time=verbose, markup=False,
                          rich_tracebacks=False)
    handler._kvmas_cli = True
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    if verbose:
        warnings.simplefilter("default")
    else:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module="kvmas")
