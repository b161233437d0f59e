"""`python -m prefopt.bench`: the DPO step benchmark (`prefopt.bench.dpo`), as before the move."""

from prefopt.bench.dpo import main

raise SystemExit(main())
