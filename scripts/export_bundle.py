r"""Export a trained bundle as a self-contained, shareable <name>_v<version>.zip (see medcl.bundle.export).

python scripts/export_bundle.py --bundle bundles/localcl_selftrain --trained_root runs/localcl --out_dir dist
python scripts/export_bundle.py --bundle bundles/mixcl --trained_root runs/mixcl --dataset_dir /data/Task09_Spleen \
    --overrides "{'patch_size': [32, 32, 32], 'feature_size': 8, 'hidden_size': 192, 'mlp_dim': 384, 'num_heads': 4}" \
    --url "https://github.com/<owner>/<repo>/releases/download/v0.1.0/{file}"
"""

import logging

import fire

from medcl.bundle.export import export_bundle

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(export_bundle)
