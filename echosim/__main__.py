import sys

from echosim.cli import main

sys.exit(main())
