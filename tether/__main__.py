"""`python -m tether ...` (and `torchrun -m tether ...`): the same as the `tether` command."""

from tether.cli import main

raise SystemExit(main())
