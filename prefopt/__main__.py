"""`python -m prefopt ...` (and so `accelerate launch -m prefopt train ...`)."""

from prefopt.cli.main import main

raise SystemExit(main())
