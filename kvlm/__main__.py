import sys

from kvlm.cli import main

sys.exit(main())
