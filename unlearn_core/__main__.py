import sys

from unlearn_core.cli import entry

sys.exit(entry())
