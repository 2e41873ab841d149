"""``python -m hf_taskarith.demo``."""

from . import main

raise SystemExit(main())
