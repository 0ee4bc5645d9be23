"""`python -m qatkit ...` (and `torchrun --nproc_per_node N -m qatkit train ...`): the `qatkit` command."""
import sys

from qatkit.cli import main

sys.exit(main())
