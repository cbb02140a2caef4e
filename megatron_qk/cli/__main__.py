"""``python -m megatron_qk.cli``: the ``megatron-qk`` console script without installing it.

The launchers and the quickstart start their children this way (the package's ``__init__`` is
not run as ``__main__`` for a package).
"""

import sys

from megatron_qk.cli import main

sys.exit(main())
