"""`python -m moesim.cli ...`: the same as the `moesim` console script."""
from moesim.cli import main

main()
