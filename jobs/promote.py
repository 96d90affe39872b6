"""`ray job submit ... -- python jobs/promote.py [options]`: the same options as `advtrain promote`."""

import sys

from pipeline.cli import run

if __name__ == "__main__":
    sys.exit(run(["promote", *sys.argv[1:]], prog_name="jobs/promote.py"))
