"""`python -m agent` is the `headwater` command."""

from agent.cli import main

raise SystemExit(main())
