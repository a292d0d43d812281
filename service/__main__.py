"""`python -m pgpush` is the `pgpush` command."""

from .cli import main

raise SystemExit(main())
