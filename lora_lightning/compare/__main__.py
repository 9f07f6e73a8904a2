"""``python -m lora_lightning.compare``: the command (and the child process of one run, ``--run-spec``)."""

import sys

from .command import main

sys.exit(main())
