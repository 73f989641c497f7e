"""``python -m qcompile ...`` (and ``torchrun --nproc-per-node N -m qcompile compile ...``): the CLI."""

from qcompile.cli import main

raise SystemExit(main())
