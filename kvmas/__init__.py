"""kvmas: multi-agent LLM systems whose agents talk through KV caches instead of text."""

import logging

# a library logs and leaves the output to its application (the CLI adds a rich handler; see kvmas.cli.logs)
logging.getLogger("kvmas").addHandler(logging.NullHandler())
