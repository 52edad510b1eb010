"""`python -m var_rt.cli ...` / `torchrun -m var_rt.cli sample ...`: the `var-rt` command."""
import sys

from var_rt.cli import main

sys.exit(main())
