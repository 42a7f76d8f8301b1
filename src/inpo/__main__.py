import sys

from inpo.cli import main

sys.exit(main())
