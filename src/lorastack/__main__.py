import sys

from lorastack.cli import main

if __name__ == "__main__":  # not when a spawned child (vLLM's engine core, torch workers) re-imports it
    sys.exit(main())
