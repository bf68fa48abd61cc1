"""`python -m fastscale ...` and the `fastscale` console script."""

import sys

from fastscale.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
