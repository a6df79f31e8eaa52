"""MONAI Label 0.8.5's BundleInferTask with one fix for MONAI 1.6; scripts/start_monailabel.sh makes the app use it.

MONAI Label puts the request's image path in ``data["image_path"]`` (a str) before the bundle's pre-transforms. Since
MONAI 1.6, ``Spacingd`` updates every ``<key>_*`` entry of the data with the image's metadata when the image is NIfTI
(``d[meta_key].update(...)``), so ``image_path`` fails with "AttributeError: 'str' object has no attribute 'update'"
for any NIfTI bundle that resamples. Here ``image_path`` is held back while the pre-transforms run and put back
afterwards (MONAI Label's writer uses it for the result's file name).
"""

from monailabel.tasks.infer.bundle import BundleInferTask as _BundleInferTask


class BundleInferTask(_BundleInferTask):
    def run_pre_transforms(self, data, transforms):
        image_path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if image_path is not None:
            data["image_path"] = image_path
        return data
