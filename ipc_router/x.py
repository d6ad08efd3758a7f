"""The AI Gateway's name for :mod:`ipc_router.extensions`: the same module object, not a copy.

``ipc_router.x.new_custom_router = f`` and ``ipc_router.extensions.new_custom_router = f`` set one attribute,
which the server reads. The star import only tells type checkers what the module holds; at run time the
import system hands out the module found in ``sys.modules`` under this name, which is replaced below.
"""

import sys

from ipc_router import extensions as _extensions
from ipc_router.extensions import *  # noqa: F403

sys.modules[__name__] = _extensions
