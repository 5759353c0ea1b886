import sys

from diffatlas.cli import main

sys.exit(main())
