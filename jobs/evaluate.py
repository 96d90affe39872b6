"""`ray job submit ... -- python jobs/evaluate.py [options]`: the same options as `advtrain evaluate`."""

import sys

from pipeline.cli import run

if __name__ == "__main__":
    sys.exit(run(["evaluate", *sys.argv[1:]], prog_name="jobs/evaluate.py"))
