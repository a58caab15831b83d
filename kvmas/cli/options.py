"""Options several commands share, declared once (typer reads an option's declaration from its default).

>>> from kvmas.cli.options import DEVICE
>>> DEVICE.param_decls
('--device',)
"""

import typer

DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: $KVMAS_DEVICE or auto)")
DTYPE = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16")
BATCH_SIZE = typer.Option(None, "--batch-size", "-b", help="questions run as rows of shared forwards "
                          "(default: as many as fit; 1: one at a time)")
