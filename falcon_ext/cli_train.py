"""Deprecated: ``python -m falcon_ext.cli_train COMMAND ...`` is ``python -m falcon_ext.cli COMMAND ...``."""
import sys
import warnings

from .cli import main

warnings.warn("falcon_ext.cli_train is deprecated: use `python -m falcon_ext.cli` (or `falcon-ext`)",
              DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    sys.exit(main())
