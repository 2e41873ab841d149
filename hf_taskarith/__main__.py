"""``python -m hf_taskarith`` (also under ``accelerate launch -m hf_taskarith``)."""

import sys

from .cli import main

sys.exit(main())
