"""`python -m app` is `hff-serve`."""

import sys

from app.main import main

sys.exit(main())
