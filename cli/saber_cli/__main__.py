import sys

from saber_cli.main import main

sys.exit(main())
