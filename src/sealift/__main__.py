import sys

from sealift.cli.main import main

sys.exit(main())
