r"""Label-efficiency benchmark over every bundle (method x label fraction x seed): see medcl.benchmark.cli.

python scripts/benchmark.py --preset cpu                      # the default CPU grid, results/cpu/
python scripts/benchmark.py --run mixcl --methods "[mixcl,mixcl_scratch]" --fractions "[0.05,0.15,1.0]" \
    --seeds "[0,1,2]"
"""

import fire

from medcl.benchmark.cli import main

if __name__ == "__main__":
    fire.Fire(main)
