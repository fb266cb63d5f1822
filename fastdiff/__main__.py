"""`python -m fastdiff ...` (and `torchrun ... -m fastdiff ...`): the fastdiff command."""
import sys

from .cli import main

sys.exit(main())
