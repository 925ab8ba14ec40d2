"""``python -m modlm.training``: train from the command line (also under ``torchrun``)."""

import sys

from modlm.training.trainer import main

sys.exit(main())
