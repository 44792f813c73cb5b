"""``python -m deepfeat.recipes.cli``: the ``deepfeat`` command."""

import sys

from deepfeat.recipes.cli import main

sys.exit(main())
