"""MONAI Label 0.8.5's bundle tasks, fitted to medcl bundles; scripts/start_monailabel.sh makes the app use them.

``BundleInferTask`` (``/infer``, ``/info/`` models):

1. MONAI 1.6 ``Spacingd``. MONAI Label puts the request's image path in ``data["image_path"]`` (a str) before the
   bundle's pre-transforms. Since MONAI 1.6, ``Spacingd`` updates every ``<key>_*`` entry of the data with the image's
   metadata when the image is NIfTI (``d[meta_key].update(...)``), so ``image_path`` fails with "AttributeError: 'str'
   object has no attribute 'update'" for any NIfTI bundle that resamples. Here ``image_path`` is held back while the
   pre-transforms run and put back afterwards (MONAI Label's writer uses it for the result's file name).
2. Errors with a message, as FastAPI ``HTTPException`` details (``{"detail": "..."}``); MONAI Label alone answers
   every failed inference with a bare "500 Internal Server Error". An image that does not exist: 404. No trained
   model yet: 404 (the task is set up without weights and serves once a ``/train`` writes ``models/model.pt``;
   MONAI Label would never serve it until a restart). A requested ``model_filename`` that is not a segmentation
   checkpoint (``run_state.pt``, ``pretrained.pt``): 400. Weights that do not fit the served config (e.g. a 3D model
   served with ``spatial_dims`` 2, or another class count): 409 with what the checkpoint is and what the config
   builds; the weights are loaded strictly (MONAI Label loads with ``strict=False``, which silently keeps random
   weights for keys that do not match). Any other failure: 500 with the exception's type and message (the traceback
   goes to the server log).
3. Labels and dimension. MONAI Label takes the label names from ``metadata.json``'s ``channel_def`` (the phantom's
   liver/spleen/kidneys/pancreas, whatever the model was trained on) and the dimension from its ``spatial_shape``.
   Here the names come from the served dataset's ``dataset.json`` (the config's ``dataset_dir``) and the dimension
   from the config's ``spatial_dims``.
4. Selectable models: ``model_filename`` lists the segmentation checkpoints of ``models/`` only (not
   ``run_state.pt``, which holds a training run's state, nor pre-training exports), ``model.pt`` first, refreshed on
   every request.

``BundleTrainTask`` (``/train``):

1. Served model first. A training starts from the served weights (``models/model.pt``, MONAI Label's
   ``CheckpointLoader``), and the bundle's ``PretrainedLoader`` handler is dropped then: pre-trained weights only
   initialise a model that has none (they used to overwrite the fine-tuned encoder on every ``/train``). With
   neither a served model nor the pre-training checkpoint (``pretrained_ckpt``), MACL/MixCL start from random
   weights (``init`` "random") with a one-line warning, instead of failing with pre-training instructions.
2. The requested epochs drive the run: the top-level ``max_epochs`` (learning-rate schedules and localcl's
   self-training plan read it; MONAI Label only sets ``train#trainer#max_epochs``), and ``val_interval`` is lowered
   to the epochs when it exceeds them, so every finished ``/train`` validates and rewrites ``model.pt``. With no
   validation study (too few labelled studies for ``val_split``) the training studies validate, with a warning.
3. Self-training (bundles with ``num_rounds``/``round_epochs``/``unlabelled``): the rounds are fitted into the
   requested epochs (:func:`medcl.handlers.self_training.scale_schedule`) and pseudo-label the datastore's studies
   that have no final label (plus the bundle's ``unlabelled_dir``), never a labelled study (matched by path and by
   file name); no such study: no round, with a warning.
4. ``model_filename`` lists and accepts segmentation checkpoints only (as above).
5. No labelled study in the datastore (no final label): the request is refused before anything runs or is written,
   with one message that says to label a study first (a synchronous ``/train?run_sync=true`` answers 409 with it;
   a queued one ends ``ERROR`` with it as the task's last line, no traceback).
6. Pre-training (bundles with ``configs/pretrain.json``: MACL, MixCL): ``"pretrain": true`` in the request (listed,
   off, in the trainer's ``/info/`` options beside ``pretrain_epochs``) first runs the bundle's ``pretrain.json`` on
   the datastore and writes ``models/pretrained.pt`` (with its weights manifest, whose ``dataset`` names the
   datastore and its image count), then fine-tunes ``train.json`` on the labelled studies from those new
   pre-trained weights: the served model is not a starting point for that run (a requested pre-training always
   re-initialises), and the run's validation replaces ``model.pt``. MACL pre-trains on every datastore image
   (labelled and unlabelled: its loss needs no label); MixCL's loss needs label maps, so it pre-trains on the
   labelled training studies (the fine-tuning's own, no validation study), and a log line says how many unlabelled
   studies it could not use. Fewer studies than the pre-training ``batch_size``: refused (409) before it runs. A
   pre-training that fails: one line with the reason (and a hint for patches too small for the network), no
   fine-tuning, ``model.pt`` unchanged. ``"pretrain": true`` on a bundle without ``pretrain.json``: 400.
7. ``"pretrained": false`` works (MONAI Label 0.8.5 failed such a request with ``os.path.exists(None)``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleInferTask as _BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask as _BundleTrainTask

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
RUN_STATE_PREFIX = "run_state"
PRETRAINED_PREFIX = "pretrained"
PRETRAINED_LOADER = "PretrainedLoader"
MANIFEST_SUFFIX = ".manifest.json"  # medcl.weights.MANIFEST_SUFFIX
PRETRAIN_CONFIG = "pretrain.json"
TRAIN_SUBPROCESS = "monailabel.interfaces.utils.app"  # what MONAI Label runs a queued /train in


def _refuse(message: str, status: int = 400):
    """Stop a training request with one message. In MONAI Label's training subprocess (a queued ``/train``) the
    process exits with the message as its last output line (the task's details end with it, status ``ERROR``);
    in the server (``/train?run_sync=true``) the request is answered ``status`` with the message as its detail."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(main, "name", None) == TRAIN_SUBPROCESS:
        raise SystemExit(f"[medcl] training refused: {message}")
    raise HTTPException(status_code=status, detail=message)


def _manifest_role(path: str) -> str | None:
    try:
        with open(path + MANIFEST_SUFFIX) as f:
            return json.load(f).get("role")
    except (OSError, ValueError, AttributeError):
        return None


def is_segmentation_checkpoint(path: str) -> bool:
    """Whether ``path`` (a ``.pt`` file of a bundle's ``models/``) can serve or start a segmentation model: not a
    run state (``run_state*.pt``) nor a pre-training export (``pretrained*.pt``, or a medcl weights manifest whose
    role is not "model")."""
    name = os.path.basename(path)
    if not name.endswith(".pt") or name.startswith((RUN_STATE_PREFIX, PRETRAINED_PREFIX)):
        return False
    return _manifest_role(path) in (None, "model")


def selectable_models(models_dir: str) -> list[str]:
    """The segmentation checkpoints of ``models_dir``, ``model.pt`` first, then by name."""
    try:
        names = [n for n in os.listdir(models_dir) if is_segmentation_checkpoint(os.path.join(models_dir, n))]
    except OSError:
        names = []
    return sorted(names, key=lambda n: (n != MODEL_FILE, len(n), n))


def _requested_file(request: dict, default: str = MODEL_FILE) -> str:
    name = request.get("model_filename") or default
    return name if isinstance(name, str) else (name[0] if name else default)


def dataset_labels(dataset_dir: str | None) -> dict[str, int] | None:
    """``{name: value}`` of the foreground labels in ``<dataset_dir>/dataset.json`` (MSD ``{"1": "liver"}`` or
    ``{"liver": 1}``), lower-cased as MONAI Label shows them; None when there is no such file or list."""
    try:
        with open(os.path.join(str(dataset_dir), "dataset.json")) as f:
            labels = json.load(f).get("labels")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(labels, dict):
        return None
    out = {}
    for k, v in labels.items():
        try:
            value, name = (int(k), str(v)) if str(k).lstrip("-").isdigit() else (int(v), str(k))
        except (TypeError, ValueError):
            return None
        if value != 0:
            out[name.lower()] = value
    return dict(sorted(out.items(), key=lambda kv: kv[1])) or None


def _parsed(config, key: str, default=None):
    """``key`` of a bundle ConfigParser, parsed without instantiating anything; ``default`` when absent or when it
    cannot be parsed here."""
    try:
        if config.get(key) is None:
            return default
        return config.get_parsed_content(key, instantiate=False)
    except Exception:  # an expression that needs the training run (data, network) to evaluate
        return default


class BundleInferTask(_BundleInferTask):
    def __init__(self, path, conf, *args, **kwargs):
        kwargs.setdefault("load_strict", True)
        super().__init__(path, conf, *args, **kwargs)
        self.model_name = os.path.basename(os.path.normpath(path))
        self.models_dir = os.path.join(path, "models")
        if getattr(self, "bundle_config", None) is None:
            return  # no inference config: MONAI Label ignores the bundle
        if not self.valid:
            self._set_up_without_weights(path, conf, kwargs)
        dims = _parsed(self.bundle_config, "spatial_dims")
        if isinstance(dims, int):
            self.dimension = dims
        labels = dataset_labels(_parsed(self.bundle_config, "dataset_dir"))
        if labels:
            self.labels = labels
        self._config["model_filename"] = selectable_models(self.models_dir)

    def _set_up_without_weights(self, path, conf, kwargs) -> None:
        """MONAI Label sets up no inference for a bundle without ``models/model.pt``, so a model trained in MONAI
        Label would only serve after a restart; here the task is set up with the network and waits for the file."""
        with open(os.path.join(path, "configs", self.const.metadata_json())) as fp:
            metadata = json.load(fp)
        self.key_image = next(iter(metadata["network_data_format"]["inputs"]))
        self.key_pred = next(iter(metadata["network_data_format"]["outputs"]))
        task_type = self._get_type(os.path.basename(path), kwargs.get("type", ""))
        self.add_post_restore = task_type != InferType.DETECTION and kwargs.get("add_post_restore", True)
        network = self.bundle_config.get_parsed_content(self.const.key_network_def(), instantiate=True)
        BasicInferTask.__init__(
            self,
            path=os.path.join(path, "models", self.const.model_pytorch()),
            network=network,
            type=task_type,
            labels={},
            dimension=3,
            description=metadata.get("description"),
            preload=False,
            load_strict=kwargs.get("load_strict", True),
        )
        self.version = metadata.get("version")
        self.valid = True
        logger.info(f"{self.model_name}: no {self.models_dir}/model.pt yet; serves once a /train writes it")

    def is_valid(self) -> bool:
        """Listed in ``/info/`` models once the served weights exist."""
        return bool(self.valid) and os.path.isfile(os.path.join(self.models_dir, MODEL_FILE))

    def config(self):
        self._config["model_filename"] = selectable_models(self.models_dir)
        return self._config

    def _check_model_file(self, request: dict) -> None:
        name = _requested_file(request)
        path = os.path.join(self.models_dir, name)
        if not is_segmentation_checkpoint(path):
            raise HTTPException(
                status_code=400,
                detail=(
                    f"model_filename {name} is not a segmentation checkpoint of {self.model_name} (run states and "
                    f"pre-training exports cannot serve); choose one of {selectable_models(self.models_dir) or '[]'}."
                ),
            )
        if not os.path.isfile(path):
            raise HTTPException(
                status_code=404,
                detail=(
                    f"{self.model_name} has no trained model yet ({name} not in {self.models_dir}): "
                    f"POST /train/{self.model_name} trains one, or restart scripts/start_monailabel.sh with "
                    "--model FILE."
                ),
            )

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
        self._config["model_filename"] = selectable_models(self.models_dir)
        self._check_model_file(request)
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

    def _get_network(self, device, data):
        if data is not None:
            self._check_model_file(data)
        try:
            return super()._get_network(device, data)
        except HTTPException:
            raise
        except Exception as e:
            path = os.path.join(self.models_dir, _requested_file(data or {}))
            raise HTTPException(status_code=409, detail=self._mismatch(path, e)) from e

    def _mismatch(self, path: str, error: Exception) -> str:
        """One line: what the checkpoint is, what the served config builds, and what to do."""
        import torch

        from medcl.weights import state_dict_facts

        want = {
            "spatial_dims": _parsed(self.bundle_config, "spatial_dims"),
            "in_channels": _parsed(self.bundle_config, "in_channels", 1),
            "out_channels": _parsed(self.bundle_config, "num_classes"),
        }
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
            have = state_dict_facts(state)
        except Exception:
            have = {}
        names = {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "out_channels": "num_classes"}
        differ = [k for k in want if have.get(k) is not None and want[k] is not None and have[k] != want[k]]
        if differ:
            what = "; ".join(f"the checkpoint has {names[k]} {have[k]}, the config {want[k]}" for k in differ)
            fix = " --set " + " --set ".join(f"{self.model_name}:{names[k]}={have[k]}" for k in differ)
        else:
            what = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            fix = " the --set values of the run that trained it"
        return (
            f"{os.path.basename(path)} does not fit {self.model_name}'s served config: {what}. Restart "
            f"scripts/start_monailabel.sh with{fix}, or serve weights trained with this config."
        )

    def run_pre_transforms(self, data, transforms):
        image_path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if image_path is not None:
            data["image_path"] = image_path
        return data


class BundleTrainTask(_BundleTrainTask):
    _served = None
    _datastore = None
    _pretrained_now = False
    _pretrained_path = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.bundle_path))

    @property
    def pretrain_config_path(self) -> str | None:
        """``configs/pretrain.json`` of the bundle (MACL, MixCL), or None."""
        path = os.path.join(self.bundle_path, "configs", PRETRAIN_CONFIG)
        return path if os.path.isfile(path) else None

    def config(self):
        options = super().config()
        options["model_filename"] = selectable_models(os.path.join(self.bundle_path, "models"))
        if self.pretrain_config_path:
            options["pretrain"] = False  # a checkbox in 3D Slicer's training options
            options["pretrain_epochs"] = self._pretrain_epochs_default()
        return options

    def _pretrain_epochs_default(self) -> int:
        try:
            with open(self.pretrain_config_path) as f:
                epochs = json.load(f).get("max_epochs")
        except (OSError, ValueError, TypeError):
            epochs = None
        return epochs if isinstance(epochs, int) and epochs > 0 else 1

    def __call__(self, request, datastore):
        name = _requested_file(request)
        path = os.path.join(self.bundle_path, "models", name)
        if not is_segmentation_checkpoint(path):
            _refuse(
                f"model_filename {name} is not a segmentation checkpoint (run states and pre-training exports "
                f"cannot start a training); choose one of {selectable_models(os.path.dirname(path)) or '[]'}."
            )
        pretrain = _flag(request.get("pretrain", False))
        if pretrain and not self.pretrain_config_path:
            _refuse(
                f'{self.name} has no pre-training (no configs/{PRETRAIN_CONFIG}); "pretrain": true applies to '
                "bundles that have one (macl, mixcl). Send the request without it."
            )
        labelled = self._fetch_datalist(request, datastore)
        if not labelled:
            images = len(datastore.list_images())
            _refuse(
                f"{self.name}: the datastore has no labelled study ({images} image(s), none with a final label), "
                "so there is nothing to train on. Label a study first (save it as final: 3D Slicer's or OHIF's "
                "Submit Label, or PUT /datastore/label?image=<id>&tag=final with the label file), then send the "
                "training request again. Nothing was trained or overwritten.",
                status=409,
            )
        self._datastore = datastore
        self._pretrained_now = False
        if pretrain:
            self._pretrain(request, datastore, labelled)
            self._pretrained_now = True
            # the fine-tuning starts from the new pre-trained weights: MONAI Label adds no CheckpointLoader
            request = {**request, "pretrained": False}
        self._served = path if _flag(request.get("pretrained", True)) and os.path.isfile(path) else None
        return super().__call__(request, datastore)

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # MONAI Label 0.8.5 calls os.path.exists(None) for "pretrained": false (TypeError: the request failed)
        if pretrained and model_pytorch and os.path.exists(model_pytorch):
            super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def _pretrain(self, request, datastore, labelled) -> None:
        """Run ``configs/pretrain.json`` on the datastore; it writes ``models/pretrained.pt`` and its manifest."""
        import monai.bundle
        from monai.bundle import ConfigParser
        from monailabel.utils.others.generic import name_to_device

        epochs = request.get("pretrain_epochs") or self._pretrain_epochs_default()
        if isinstance(epochs, str) and epochs.strip().isdigit():
            epochs = int(epochs)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            _refuse(f"pretrain_epochs must be a whole number >= 1, got {epochs!r}.")
        parser = ConfigParser()
        parser.read_config(self.pretrain_config_path)
        parser["bundle_root"] = self.bundle_path
        images = sorted(datastore.list_images())
        unlabelled = len(datastore.get_unlabeled_images())
        if parser.get("pretrain_dataset_dirs") is not None:
            # MixCL: the label-consistency loss needs label maps; the fine-tuning's training studies only
            from medcl.data import read_dataset_info

            train_ds, _ = self._partition_datalist(labelled, request)
            modality = read_dataset_info(_parsed(parser, "dataset_dir")).modality
            data = [{"image": d["image"], "label": d["label"], "dataset_id": 0, "modality": modality} for d in train_ds]
            what = (
                f"the {len(data)} labelled training studies (its loss needs label maps: {unlabelled} unlabelled and "
                f"{len(labelled) - len(data)} validation studies not used)"
            )
        else:
            data = [{"image": datastore.get_image_uri(i)} for i in images]
            what = f"all {len(data)} datastore images ({len(images) - unlabelled} labelled, {unlabelled} unlabelled)"
        batch_size = _parsed(parser, "batch_size", 1)
        if isinstance(batch_size, int) and len(data) < batch_size:  # drop_last: not one batch
            _refuse(
                f"{self.name}: pre-training needs at least batch_size ({batch_size}) studies, the datastore gives "
                f"{what}: label more studies{' or lower val_split' if len(data) < len(labelled) else ''}, then send "
                "the request again. Nothing was trained or overwritten.",
                status=409,
            )
        studies = getattr(datastore, "_datastore_path", None)
        overrides = {
            "bundle_root": self.bundle_path,
            "device": name_to_device(request.get("device", "cuda")),
            "max_epochs": epochs,
            "pretrain_datalist": data,
            "weights_manifest#dataset": {
                "dir": os.path.abspath(studies) if studies else None,
                "source": "MONAI Label datastore",
                "num_images": len(data),
                "num_labelled": len(images) - unlabelled,
                "num_unlabelled": unlabelled,
            },
        }
        ckpt_dir = _parsed(parser, "ckpt_dir", os.path.join(self.bundle_path, "models"))
        self._pretrained_path = os.path.join(str(ckpt_dir), "pretrained.pt")
        before = _file_stamp(self._pretrained_path)
        self._say(f"{self.name}: pre-training ({PRETRAIN_CONFIG}, {epochs} epoch(s)) on {what}")
        try:
            monai.bundle.run(
                run_id="run",
                init_id=None,
                final_id=None,
                meta_file=self.bundle_metadata_path,
                config_file=self.pretrain_config_path,
                **overrides,
            )
        except Exception as e:
            logger.exception(f"{self.name}: pre-training failed")
            cause = e
            while cause.__cause__ is not None:  # MONAI wraps the error in "Failed to evaluate ..." RuntimeErrors
                cause = cause.__cause__
            reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:400]
            hint = ""
            if "Output size is too small" in reason or "too small" in reason.lower():
                hint = (
                    f" The patches are too small for the network (patch_size {_parsed(parser, 'patch_size')}, "
                    f"spatial_dims {_parsed(parser, 'spatial_dims')}, view scale {_parsed(parser, 'scale', 1)}): "
                    f"restart scripts/start_monailabel.sh with a larger --set {self.name}:patch_size=[...]."
                )
            kept = "unchanged" if _file_stamp(self._pretrained_path) == before else "replaced by the interrupted run"
            _refuse(
                f"{self.name}: pre-training failed: {reason}.{hint} No fine-tuning ran: model.pt is unchanged, "
                f"pretrained.pt {kept} (the server log has the traceback).",
                status=500,
            )
        self._say(f"{self.name}: pre-training done: {self._pretrained_path}")

    def _say(self, message: str, warning: bool = False) -> None:
        # the training subprocess logs to its stdout: the server log and the task's details (GET /train/)
        (logger.warning if warning else logger.info)(message)

    def _update_overrides(self, overrides):
        cfg = self.bundle_config
        name = os.path.basename(os.path.normpath(self.bundle_path))
        epochs = int(overrides[self.const.key_train_trainer_max_epochs()])
        bundle_epochs = _parsed(cfg, "max_epochs")
        if cfg.get("max_epochs") is not None:
            overrides["max_epochs"] = epochs

        # every finished /train validates at least once (the validation rewrites model.pt)
        val_interval = _parsed(cfg, "val_interval")
        if isinstance(val_interval, int) and val_interval > epochs:
            overrides["val_interval"] = epochs
            self._say(f"{name}: val_interval {val_interval} > {epochs} epochs: validating every {epochs} epochs")
        train_data = overrides.get(self.const.key_train_dataset_data()) or []
        key_val = self.const.key_validate_dataset_data()
        if key_val in overrides and not overrides[key_val]:
            overrides[key_val] = copy.deepcopy(train_data)
            self._say(
                f"{name}: no validation study ({len(train_data)} labelled, val_split too small): validating on the "
                "training studies, so model.pt is rewritten",
                warning=True,
            )

        # served weights first; pre-trained weights only initialise a model that has none
        handlers = overrides.get(self.const.key_train_handlers())
        if cfg.get("init") is not None and isinstance(handlers, list):
            init = _parsed(cfg, "init")
            ckpt = _parsed(cfg, "pretrained_ckpt")
            has_pretrained = isinstance(ckpt, str) and os.path.isfile(ckpt)
            if self._pretrained_now:
                ckpt = self._pretrained_path  # what pretrain.json wrote
                if not os.path.isfile(ckpt):
                    _refuse(f"{name}: the pre-training wrote no {ckpt}; see the log above.", 500)
                overrides["pretrained_ckpt"] = ckpt
                if init == "random":
                    overrides["init"] = "pretrained"
                self._say(
                    f"{name}: pretrain requested: fine-tuning from the new pre-training checkpoint {ckpt} (the served "
                    "model is not a starting point for this run)"
                )
            elif self._served:
                overrides[self.const.key_train_handlers()] = [
                    h for h in handlers if not str(h.get("_target_", "")).endswith(PRETRAINED_LOADER)
                ]
                if init != "random" and not has_pretrained:
                    overrides["init"] = "random"
                self._say(
                    f"{name}: training from the served model {os.path.basename(self._served)}; pre-trained weights "
                    "are not applied (they only initialise a model that has none)"
                )
            elif init != "random" and not has_pretrained:
                overrides["init"] = "random"
                self._say(
                    f"{name}: no served model and no pre-training checkpoint ({ckpt}): training from random init",
                    warning=True,
                )
            elif init != "random":
                self._say(f"{name}: no served model: initialising from the pre-training checkpoint {ckpt}")

        # self-training: the rounds fit the requested epochs and pseudo-label unlabelled studies only
        if all(cfg.get(k) is not None for k in ("num_rounds", "round_epochs", "unlabelled")):
            self._plan_self_training(name, overrides, epochs, bundle_epochs, train_data)
        return overrides

    def _plan_self_training(self, name, overrides, epochs, bundle_epochs, train_data) -> None:
        from medcl.handlers.self_training import scale_schedule

        cfg = self.bundle_config
        labelled = list(train_data) + list(overrides.get(self.const.key_validate_dataset_data()) or [])
        paths = {os.path.realpath(d["image"]) for d in labelled}
        stems = {_stem(d["image"]) for d in labelled}
        pool = []
        datastore = getattr(self, "_datastore", None)
        if datastore is not None:
            pool = [{"image": datastore.get_image_uri(i)} for i in sorted(datastore.get_unlabeled_images())]
        extra_dir = _parsed(cfg, "unlabelled_dir")
        if extra_dir:
            from medcl.data import inference_datalist

            pool += [{"image": d["image"]} for d in inference_datalist(input_dir=extra_dir, check="off")]
        kept = [d for d in pool if os.path.realpath(d["image"]) not in paths and _stem(d["image"]) not in stems]
        if len(kept) < len(pool):
            self._say(f"{name}: {len(pool) - len(kept)} labelled studies left out of the pseudo-label pool")
        overrides["unlabelled"] = kept
        num_rounds, round_epochs = int(_parsed(cfg, "num_rounds", 0)), int(_parsed(cfg, "round_epochs", 1))
        total = bundle_epochs if isinstance(bundle_epochs, int) else epochs
        baseline, rounds, per = scale_schedule(epochs, num_rounds, round_epochs, total)
        if not kept and rounds:
            baseline, rounds = epochs, 0
            self._say(f"{name}: no unlabelled study in the datastore: no self-training round", warning=True)
        elif num_rounds and not rounds:
            self._say(f"{name}: {epochs} epoch(s) leave no room for a self-training round (needs >= 2)", warning=True)
        overrides["num_rounds"], overrides["round_epochs"] = rounds, per
        self._say(
            f"{name}: self-training plan for {epochs} epochs: {baseline} baseline + {rounds} round(s) x {per} "
            f"(bundle: {total - num_rounds * round_epochs} + {num_rounds} x {round_epochs}); pool of {len(kept)} "
            f"unlabelled studies: {', '.join(os.path.basename(d['image']) for d in kept) or 'none'}"
        )


def _file_stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _flag(value) -> bool:
    """A request's boolean option, also as sent by form-based clients ("true"/"false")."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _stem(path: str) -> str:
    name = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]
