import sys

from harvester.cli import main

sys.exit(main())
