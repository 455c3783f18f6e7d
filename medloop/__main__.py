"""``python -m medloop``. Run from inside a workspace, the current folder comes first on
``sys.path`` and its copy of the stage code (``pipelines/``, kept there for DVC and for
reproduction) would shadow the installed medloop's; the command line always uses the installed
code, as the ``medloop`` script does, so the current folder is taken off the path first."""

import os
import sys

if sys.path and not sys.flags.safe_path and os.path.abspath(sys.path[0] or os.curdir) == os.path.abspath(os.curdir):
    del sys.path[0]

from medloop.cli import main  # noqa: E402 - after the path is fixed

main()
