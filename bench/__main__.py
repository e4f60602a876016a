import sys

from bench.cli import main

if __name__ == "__main__":  # worker processes (bench.producers) import this module without running the CLI
    sys.exit(main())
