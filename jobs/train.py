"""`ray job submit ... -- python jobs/train.py --config jobs/configs/digits_demo.toml [--set k=v ...]`"""

import sys

from pipeline.cli import run

if __name__ == "__main__":
    sys.exit(run(["train", *sys.argv[1:]], prog_name="jobs/train.py"))
