import sys

from lorastack.cli import main

sys.exit(main())
