"""`python -m cifarflow` runs the CLI."""

from cifarflow.cli import main

raise SystemExit(main())
