"""`python -m parsl_aurora.image lock|build ...`: see parsl_aurora.image.build.main."""

import sys

from parsl_aurora.image.build import main

sys.exit(main())
