"""`python -m aiwfd` works as the `aiwfd` command."""

from aiwfd.cli import main

raise SystemExit(main())
