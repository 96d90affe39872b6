"""`ray job submit ... -- python jobs/tune.py --config jobs/configs/fashion_mnist_pgd.toml
--search jobs/configs/search_fashion_mnist.toml [--num-samples N] [--name NAME --resume]`"""

import sys

from pipeline.cli import run

if __name__ == "__main__":
    sys.exit(run(["tune", *sys.argv[1:]], prog_name="jobs/tune.py"))
