"""`python -m prefopt ...` (and so `accelerate launch -m prefopt train ...`)."""

from prefopt.cli import main

raise SystemExit(main())
