"""`python -m service` is `pgpush`."""

from service.cli import main

raise SystemExit(main())
