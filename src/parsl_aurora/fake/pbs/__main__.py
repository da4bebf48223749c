import sys

from parsl_aurora.fake.pbs.cli import main

sys.exit(main())
