"""`python -m txt2img` runs the CLI."""

import sys

from txt2img.cli import main

sys.exit(main())
