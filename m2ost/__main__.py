import sys

from m2ost.cli import main

sys.exit(main())
