import sys

from twofile.cli import main

sys.exit(main())
