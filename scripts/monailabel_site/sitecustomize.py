"""Let torchvision's Python code import beside a CPU-only torch; put on PYTHONPATH by scripts/start_monailabel.sh.

MONAI Label 0.8.5 imports ``torchvision.utils`` at start-up (``monailabel.transform.post``). PyPI's torchvision wheel
is built against the CUDA torch: its C++ ops (``_C.so``, linked to ``libtorch_cuda.so``) cannot load beside the CPU
torch. torchvision is meant to import without them (``extension._has_ops()`` is then False), but 0.28 registers fake
kernels for ``torchvision::nms`` / ``torchvision::qnms`` unguarded and fails with "operator torchvision::nms does not
exist" (pytorch/vision#9337). Declaring the two operator schemas, without kernels, lets the import finish; calling
``torchvision.ops.nms`` still raises torchvision's own "Couldn't load custom C++ ops" error. Nothing happens when
torchvision is absent or its ops load.
"""

import importlib.util
import os

_spec = importlib.util.find_spec("torchvision")
if _spec is not None and _spec.submodule_search_locations:
    import torch

    _lib = os.path.join(list(_spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(_lib)
    except (OSError, ImportError):
        _defs = torch.library.Library("torchvision", "FRAGMENT")
        _defs.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _defs.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
