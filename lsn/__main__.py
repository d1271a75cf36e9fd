import sys

from lsn.cli import main

sys.exit(main())
