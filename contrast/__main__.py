import sys

from contrast.cli import main

sys.exit(main())
