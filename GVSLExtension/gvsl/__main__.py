"""``python -m gvsl ...`` (also what torchrun runs: ``torchrun ... -m gvsl pretrain ...``)."""
import sys

from gvsl.cli import main

if __name__ == "__main__":
    sys.exit(main())
