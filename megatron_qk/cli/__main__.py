"""``python -m megatron_qk.cli``: the ``megatron-qk`` console script without installing it."""

import sys

from megatron_qk.cli import main

sys.exit(main())
