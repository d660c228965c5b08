"""``python -m crate_fast.analyze``: the analysis command line of crate_fast.analysis (its __main__)."""
from .analysis.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
