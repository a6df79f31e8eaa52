"""Weights that load where users need them: the manifest beside every weights file medcl writes
(:mod:`medcl.weights.manifest`), input-channel and class-count adaptation when loading pre-trained weights
(:mod:`medcl.weights.adapt`), and ``python -m medcl.weights inspect FILE`` (:mod:`medcl.weights.__main__`)."""

from medcl.weights.adapt import CHANNEL_MODES, adapt_in_channels, adapt_state_dict, load_table
from medcl.weights.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_SUFFIX,
    build_manifest,
    manifest_path,
    network_spec,
    read_manifest,
    state_dict_facts,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "CHANNEL_MODES",
    "MANIFEST_FORMAT",
    "MANIFEST_SUFFIX",
    "adapt_in_channels",
    "adapt_state_dict",
    "build_manifest",
    "load_table",
    "manifest_path",
    "network_spec",
    "read_manifest",
    "state_dict_facts",
    "verify_manifest",
    "write_manifest",
]
