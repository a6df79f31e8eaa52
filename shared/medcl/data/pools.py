"""Data pools of any size in bounded memory: one factory that picks MONAI's in-memory ``CacheDataset``, its on-disk
``PersistentDataset`` or a ``CacheDataset`` with a bounded window, by configuration or by the number of volumes.

=========  ===========================================================  ==========================================
mode       dataset                                                      memory
=========  ===========================================================  ==========================================
memory     ``CacheDataset(cache_rate=...)``: every preprocessed volume  grows with the pool (today's behaviour)
           held in memory, built before the first iteration
disk       ``PersistentDataset`` under ``<cache_dir>/<name>``: each     one volume per loader worker; disk grows
           volume preprocessed on first use, saved, then read back      with the pool
window     ``CacheDataset(cache_num=...)``: the first ``cache_num``     ``cache_num`` volumes; the others are
           volumes in memory, every other volume preprocessed from its  preprocessed again on every draw
           file on every draw
auto       ``memory`` up to ``memory_max_items`` volumes, else ``disk``
           (``window`` when no ``cache_dir`` is given)
=========  ===========================================================  ==========================================

Every mode returns each item of the pool once per epoch of a shuffling loader, so random crops come from the whole
pool; only where the deterministic preprocessing is kept differs. None of them changes what a run computes, so a
killed run resumes exactly as with ``CacheDataset`` (``--resume true``, tests/test_resume.py).

The on-disk cache key is MONAI's: a hash of the datalist item plus ``hash_transform`` of the deterministic
transforms (their pickled settings, salted with the medcl, MONAI and torch versions): a changed preprocessing or
library version writes new items and never reads stale ones. An item that still does not fit (it lacks a key of the
datalist item or cannot be read), a cache folder that is not writable, and a disk that fills while caching each stop
the run with one :class:`~medcl.errors.MedclInputError` naming the folder and the fix.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.data.utils import pickle_hashing

import medcl
from medcl.errors import MedclInputError, find_medcl_error

__all__ = ["POOL_MODES", "PoolPersistentDataset", "make_pool_dataset", "pool_transform_hash"]

logger = logging.getLogger(__name__)

POOL_MODES = ("auto", "memory", "disk", "window")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def pool_transform_hash(transforms: Any) -> bytes:
    """The cache-key part of the preprocessing: MONAI's ``pickle_hashing`` of the deterministic ``transforms`` (their
    classes and settings) and of the medcl, MONAI and torch versions (a release may change what a transform does).

    Args:
        transforms: the list of deterministic transforms ``PersistentDataset.set_transform_hash`` hands over.

    Returns:
        the hex digest as bytes, as MONAI's ``hash_transform`` expects.
    """
    return pickle_hashing([transforms, medcl.__version__, monai.__version__, torch.__version__])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class PoolPersistentDataset(PersistentDataset):
    """MONAI's :class:`~monai.data.PersistentDataset` whose cache problems are one message naming the folder and the
    fix instead of a traceback, a silent recomputation, or a stale item.

    Shapes are the transform's: a datalist item ``{"image": path, ...}`` becomes what ``transform`` returns (e.g. a
    ``(1, H, W, D)`` image and the random crops of it). The cache folder is checked for writing when the dataset is
    made; MONAI itself would skip writing silently on a ``PermissionError`` and preprocess every volume on every draw.
    ``set_data`` (a self-training round's new pseudo-labels) empties the folder, so give each pool its own folder
    (:func:`make_pool_dataset` uses ``<cache_dir>/<name>``).

    Args:
        data: datalist items (dicts of file paths); hashed as cache keys.
        transform: a ``Compose``; its transforms up to the first random one are cached.
        cache_dir: the folder of this pool's ``.pt`` items (created when missing).
        kwargs: other :class:`~monai.data.PersistentDataset` arguments (``hash_transform`` defaults to
            :func:`pool_transform_hash`).

    Raises:
        MedclInputError: the folder cannot be created or written; later, while loading, a disk that fills or an
            item written by another preprocessing.
    """

    def __init__(self, data: Sequence, transform: Callable, cache_dir: str | os.PathLike, **kwargs: Any) -> None:
        _check_writable(Path(cache_dir))
        kwargs.setdefault("hash_transform", pool_transform_hash)
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, **kwargs)

    def cached_items(self) -> tuple[int, int]:
        """``(items of this preprocessing, items of another one)`` now in the cache folder."""
        ours = other = 0
        if self.cache_dir is not None and self.cache_dir.is_dir():
            for f in os.scandir(self.cache_dir):
                if f.name.endswith(".pt"):
                    if f.name.endswith(f"{self.transform_hash}.pt"):
                        ours += 1
                    else:
                        other += 1
        return ours, other

    def _cachecheck(self, item_transformed: Any) -> Any:
        folder = self.cache_dir
        try:
            out = super()._cachecheck(item_transformed)
        except OSError as e:
            if e.errno in _FULL:
                free = shutil.disk_usage(folder).free if folder is not None and folder.is_dir() else 0
                raise MedclInputError(
                    f"{folder}: the disk is full while caching a preprocessed volume ({_mib(free)} free there; MONAI "
                    f"writes each item to {tempfile.gettempdir()} first, then moves it). Free space, pass --cache_dir "
                    "on a larger disk, or --pool_mode window to keep only --cache_num volumes in memory; the items "
                    "already cached are reused."
                ) from e
            raise
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            cause = find_medcl_error(e)
            if cause is not None:  # a transform's own message (e.g. CheckFilesd on a bad file), not the cache's
                raise cause from None
            raise MedclInputError(
                f"{folder}: a cached item cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it was "
                "written by another preprocessing or another MONAI/torch. Delete the folder (it is rebuilt on the "
                "next run) or pass another --cache_dir."
            ) from e
        if isinstance(item_transformed, Mapping) and isinstance(out, Mapping):
            missing = [k for k in item_transformed if k not in out]
            if missing:
                raise MedclInputError(
                    f"{folder}: a cached item lacks {missing} of the datalist item {dict(item_transformed)}; it was "
                    "written by another preprocessing. Delete the folder (it is rebuilt on the next run) or pass "
                    "another --cache_dir."
                )
        return out


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file there.

    Raises:
        MedclInputError: naming the folder and the fix when either fails.
    """
    fix = "Pass a writable --cache_dir, or --pool_mode memory (or window) to keep the pool in memory."
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medcl_write_probe.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if e.errno in _FULL:
            raise MedclInputError(f"{folder}: the disk is full; the pool cannot be cached there. {fix}") from e
        raise MedclInputError(f"{folder}: the pool cache folder is not writable ({e.strerror}). {fix}") from e


def make_pool_dataset(
    data: Sequence,
    transform: Callable,
    mode: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    name: str = "pool",
    memory_max_items: int = 100,
    cache_num: int = 64,
    cache_rate: float = 1.0,
    num_workers: int | None = 1,
    progress: bool = False,
    expected_items: int | None = None,
) -> CacheDataset | PersistentDataset:
    """A MONAI dataset over a pool of volumes whose memory is bounded when the pool is large.

    See the module docstring for the modes. One INFO line names the mode taken and the counts.

    Args:
        data: datalist items (e.g. ``{"image": path}``); ``N = len(data)`` volumes.
        transform: the preprocessing (``Compose``); deterministic transforms first, then the random ones.
        mode: ``"auto"``, ``"memory"``, ``"disk"`` or ``"window"``.
        cache_dir: root folder of on-disk caches; this pool uses ``<cache_dir>/<name>``. Needed by ``"disk"``.
        name: the pool's name, its sub-folder and its name in the log (e.g. ``"pretrain"``, ``"pseudo"``).
        memory_max_items: ``"auto"`` keeps pools of at most this many volumes in memory.
        cache_num: volumes held in memory by ``"window"``.
        cache_rate: fraction of the pool held by ``"memory"`` (``CacheDataset``'s ``cache_rate``).
        num_workers: threads ``CacheDataset`` builds its cache with.
        progress: show ``CacheDataset``'s progress bar.
        expected_items: the number of volumes ``"auto"`` decides on when ``data`` is filled later by ``set_data``
            (e.g. the pseudo-labelled pool: the size of the unlabelled pool); defaults to ``len(data)``.

    Returns:
        ``CacheDataset`` (memory, window) or :class:`PoolPersistentDataset`, a ``PersistentDataset`` (disk).

    Raises:
        MedclInputError: an unknown mode, ``"disk"`` without ``cache_dir``, a negative count, or a cache folder that
            cannot be written.
    """
    if mode not in POOL_MODES:
        raise MedclInputError(f"pool_mode={mode!r} is not one of {list(POOL_MODES)}; e.g. --pool_mode auto.")
    if int(memory_max_items) < 0 or int(cache_num) < 0:
        raise MedclInputError(
            f"pool_memory_max={memory_max_items} and cache_num={cache_num} must be >= 0; e.g. --cache_num 64."
        )
    n = len(data) if expected_items is None else int(expected_items)
    chosen = mode
    if mode == "auto":
        chosen = "memory" if n <= int(memory_max_items) else ("disk" if cache_dir else "window")
    why = (
        f" (auto: {'at most' if chosen == 'memory' else 'more than'} {memory_max_items} volumes)"
        if mode == "auto"
        else ""
    )
    if chosen == "disk":
        if not cache_dir:
            raise MedclInputError(
                f"pool_mode 'disk' of the {name} pool needs a cache folder: pass --cache_dir <folder> "
                "(or --pool_mode window to keep --cache_num volumes in memory)."
            )
        folder = Path(cache_dir) / name
        ds: CacheDataset | PersistentDataset = PoolPersistentDataset(data, transform, cache_dir=folder)
        ours, other = ds.cached_items()
        logger.info(
            "%s pool: %d volumes, mode disk%s: PersistentDataset in %s (%d already cached)",
            name,
            n,
            why,
            folder,
            ours,
        )
        if other:
            logger.warning(
                "%s: %d cached items of another preprocessing or version are not used; delete them to free the disk.",
                folder,
                other,
            )
        return ds
    if chosen == "window":
        ds = CacheDataset(data, transform, cache_num=int(cache_num), num_workers=num_workers, progress=progress)
        logger.info(
            "%s pool: %d volumes, mode window%s: CacheDataset holding %d in memory, the others read on every draw",
            name,
            n,
            why,
            min(int(cache_num), n),
        )
        return ds
    ds = CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress)
    logger.info("%s pool: %d volumes, mode memory%s: CacheDataset holding %d in memory", name, n, why, ds.cache_num)
    return ds
