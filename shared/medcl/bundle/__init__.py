# Copyright (c) medcl contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Bundle tooling that works offline: the metadata schema medcl keeps, and checking a bundle's metadata with it.

MONAI's ``verify_metadata`` downloads the schema named in ``metadata.json`` unless ``--filepath`` already holds a
file; :data:`META_SCHEMA` is that file::

    python -m monai.bundle verify_metadata --meta_file bundles/macl/configs/metadata.json \\
        --filepath "$(python -c 'import medcl.bundle as b; print(b.META_SCHEMA)')"
"""

from __future__ import annotations

import os

from monai.bundle import verify_metadata

from medcl.bundle.overrides import check_cli_overrides

__all__ = ["META_SCHEMA", "check_cli_overrides", "verify_metadata_offline"]

#: JSON schema of medcl's ``configs/metadata.json`` (the MONAI bundle specification's fields), shipped with medcl.
META_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_schema.json")


def verify_metadata_offline(meta_file: str | os.PathLike) -> None:
    """Run ``monai.bundle.verify_metadata`` on ``meta_file`` against :data:`META_SCHEMA` (no download).

    Raises:
        ValueError: naming the field that fails the schema (MONAI's message).
    """
    verify_metadata(meta_file=os.fspath(meta_file), filepath=META_SCHEMA)
