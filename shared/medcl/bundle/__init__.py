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
file; :data:`META_SCHEMA` is that file, and :data:`META_SCHEMA_SHA256` its hash (without a hash MONAI warns that the
file's integrity is not verified)::

    python -m monai.bundle verify_metadata --meta_file bundles/macl/configs/metadata.json \\
        --filepath "$(python -c 'import medcl.bundle as b; print(b.META_SCHEMA)')" \\
        --hash_val "$(python -c 'import medcl.bundle as b; print(b.META_SCHEMA_SHA256)')" --hash_type sha256
"""

from __future__ import annotations

import os

from monai.bundle import verify_metadata

from medcl.bundle.overrides import check_cli_overrides

__all__ = ["META_SCHEMA", "check_cli_overrides", "verify_metadata_offline"]

#: JSON schema of medcl's ``configs/metadata.json`` (the MONAI bundle specification's fields), shipped with medcl.
META_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_schema.json")
#: sha256 of :data:`META_SCHEMA` as shipped. ``verify_metadata`` checks the file against it (a changed file stops the
#: check with MONAI's ``HashCheckError``); after editing the schema, put the new ``sha256sum`` here
#: (tests/test_bundle_tools.py compares the two).
META_SCHEMA_SHA256 = "6007dc6df5c8a9f0511ecf488a8922be3b93cb743985e2fd34b8d804900988a9"


def verify_metadata_offline(meta_file: str | os.PathLike) -> None:
    """Run ``monai.bundle.verify_metadata`` on ``meta_file`` against :data:`META_SCHEMA` (no download), checking the
    schema file's sha256 first.

    Raises:
        ValueError: naming the field that fails the schema (MONAI's message).
        monai.apps.utils.HashCheckError: :data:`META_SCHEMA` does not match :data:`META_SCHEMA_SHA256`.
    """
    verify_metadata(
        meta_file=os.fspath(meta_file), filepath=META_SCHEMA, hash_val=META_SCHEMA_SHA256, hash_type="sha256"
    )
