"""``python -m medcl.benchmark``: see :mod:`medcl.benchmark.cli`."""

import fire

from medcl.benchmark.cli import main

if __name__ == "__main__":
    fire.Fire(main)
