"""The AI Gateway's name for :mod:`ipc_router.config` (its ``filterapi`` package): the same module object.

The star import only tells type checkers what the module holds; at run time the import system hands out the
module found in ``sys.modules`` under this name, which is replaced below.
"""

import sys

from ipc_router import config as _config
from ipc_router.config import *  # noqa: F403

sys.modules[__name__] = _config
