import sys

from gateway.tools.cli import main

sys.exit(main())
