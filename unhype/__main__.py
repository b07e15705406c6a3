"""`python -m unhype` is the same as the `unhype` console script."""

from unhype.cli import main

raise SystemExit(main())
