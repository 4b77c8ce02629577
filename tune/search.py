"""Ray Tune search over ResNet shape and training settings (see docs/search.md): the command users type.

    python tune/search.py --space tune/space.yaml --num-samples 8 --max-epochs 10

The search itself lives in the package: cifar_dist/search/ (space, trial, report, cli).
"""
import sys

from cifar_dist.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
