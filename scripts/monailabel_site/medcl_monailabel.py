"""MONAI Label 0.8.5's BundleInferTask with two fixes; scripts/start_monailabel.sh makes the app use it.

1. MONAI 1.6 ``Spacingd``. MONAI Label puts the request's image path in ``data["image_path"]`` (a str) before the
   bundle's pre-transforms. Since MONAI 1.6, ``Spacingd`` updates every ``<key>_*`` entry of the data with the image's
   metadata when the image is NIfTI (``d[meta_key].update(...)``), so ``image_path`` fails with "AttributeError: 'str'
   object has no attribute 'update'" for any NIfTI bundle that resamples. Here ``image_path`` is held back while the
   pre-transforms run and put back afterwards (MONAI Label's writer uses it for the result's file name).
2. Errors with a message. MONAI Label registers no handler for exceptions raised during inference, so the client of
   ``/infer`` gets a bare "500 Internal Server Error" whatever went wrong, e.g. for an image id that is not in the
   datastore (MONAI Label resolves it to the path "" and image loading fails). Here an image that does not exist is
   answered with 404 and what to do, and any other failure with 500 and the exception's type and message (the
   traceback goes to the server log), as FastAPI ``HTTPException`` details: ``{"detail": "..."}``.
"""

import logging
import os

from fastapi import HTTPException
from monailabel.tasks.infer.bundle import BundleInferTask as _BundleInferTask

logger = logging.getLogger(__name__)


class BundleInferTask(_BundleInferTask):
    def __call__(self, request, callbacks=None):
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            raise HTTPException(
                status_code=404,
                detail=(
                    f"image not found: {image or 'the image id is not in the datastore'}. "
                    "GET /datastore/?output=all lists the image ids; PUT /datastore/image?image=<id> (a file) adds one."
                ),
            )
        try:
            return super().__call__(request, callbacks)
        except HTTPException:
            raise
        except Exception as e:
            logger.exception(f"inference failed on {image}")
            raise HTTPException(
                status_code=500,
                detail=f"inference failed on {image}: {type(e).__name__}: {e} (the server log has the traceback)",
            ) from e

    def run_pre_transforms(self, data, transforms):
        image_path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if image_path is not None:
            data["image_path"] = image_path
        return data
