import sys

from dsv.cli import main

sys.exit(main())
