"""Synthetic multi-organ CT-like phantom, written as a Medical Segmentation Decathlon (MSD) dataset.

The phantom lets tests and demos train and compare segmentation networks (e.g. 10 % vs 100 % of the labels)
without downloading patient data. Each case is a 3D volume in Hounsfield units (HU) with a label map.

What it models:

- **Anatomy in normalised field-of-view coordinates.** Every structure is defined in ``[-1, 1]^3`` coordinates
  of the field of view (x: patient right -> left, y: anterior -> posterior, z: inferior -> superior), so a case
  fits any requested array shape (tests use 32^3, the demo 64x64x48).
- **Three organ sets with different label maps** (:data:`ORGAN_SETS`): ``"abdomen"`` (liver, spleen, kidneys,
  pancreas), ``"pelvis"`` (bladder, prostate, rectum, femoral heads) and ``"thorax"`` (heart, aorta, esophagus,
  trachea, lungs), so a library can pool several labelled datasets whose label maps differ. The sets are tables
  of :class:`Structure` specs painted in order by one generic renderer.
- **Shapes**: superquadrics (ellipsoids with adjustable squareness) and tubes along polylines, optionally hollow
  (shells) or cut into periodic slabs along z (vertebrae, ribs), with inner parts (renal sinus, rectal gas,
  heart chambers, stomach gas). Per case: patient size/position/rotation jitter, per-structure position, scale,
  rotation and intensity jitter, and a random smooth (elastic) displacement field shared by all structures.
- **Unlabelled distractors**: subcutaneous fat, abdominal/chest wall muscle, textured visceral fat, spine
  (vertebral bodies ~300-900 HU, discs, posterior elements), aorta/IVC (abdomen), stomach with gas, gallbladder,
  paraspinal muscles, pelvic bones, ribs, bronchi.
- **Image formation**: air (-1000 HU) outside an elliptical body; per-structure texture (smoothed noise);
  partial volume at every border (each structure's occupancy is a one-voxel linear ramp of its signed distance,
  and structures are alpha-composited with it); a small Gaussian point-spread function; a smooth additive and
  multiplicative bias field; white Gaussian noise with a per-case standard deviation of 15-25 HU (ranges of the
  ``"standard"`` variant; see *Variants*).
- **Labels**: a voxel gets a structure's label where its occupancy is >= 0.5. Structures are painted in a fixed
  order, later ones override earlier ones (unlabelled distractors painted later erase labels underneath them, as
  a gallbladder cuts into the liver), so labels never overlap and always agree with the image.
- **Absent classes**: each structure has a probability of being absent in a case (see ``p_absent`` in the
  tables): abdomen - pancreas 0.10, each kidney 0.05; pelvis - prostate 0.10 (a "female" or post-prostatectomy
  pelvis); thorax - esophagus 0.05. A class can therefore be missing from a case's label map.
- **Geometry**: anisotropic voxels, in-plane spacing U(1.4, 1.8) mm (square pixels), slice spacing U(2.0, 3.0) mm;
  affine ``diag(-sx, -sy, sz)`` plus an origin near the volume centre, as NIfTI converted from DICOM/ITK (LPS) has
  it, so reorienting to RAS requires flipping the first two axes.

Label maps and nominal intensities (HU; per-case jitter of a few HU, plus texture, bias and noise):

=========  ==========================================================================================
abdomen    1 liver 60, 2 spleen 45, 3 kidneys 150 (two, renal sinus 20), 4 pancreas 40 (thin, elongated);
           visceral background ~15 +- 18 (fat/soft-tissue texture), muscle 50, aorta 150, IVC 110
pelvis     1 bladder 8, 2 prostate 40, 3 rectum 30 (stool/gas content 10 +- 40 in half the cases),
           4 femoral_heads 450 (two); background fat ~-40, acetabulum 750, pelvic bones 450-650
thorax     1 heart 100 (chambers 140), 2 aorta 170, 3 esophagus 35, 4 trachea -950, 5 lungs -820 (two);
           mediastinal fat ~-60, bronchi -950 (unlabelled), ribs 700
all        air -1000, subcutaneous fat -100, muscle wall 50, spine (abdomen, thorax): discs 90,
           vertebral cortex 850 / cancellous 320, posterior elements 650
=========  ==========================================================================================

Variants (``variant=`` of :func:`generate_case` and :func:`generate_dataset`, ``--variant`` of the CLI; recorded as
``medcl_phantom["variant"]`` in ``dataset.json``). All ranges are frozen in the table :data:`PHANTOM_VARIANTS`
(:class:`PhantomVariant`):

- ``"standard"`` (default): the ranges given above; its output does not change (pinned by a checksum test).
- ``"varied"``: realistic inter-subject variability. Why: standard cases differ little (one contrast, similar
  noise and organ sizes), so a network trained on 3 labelled cases nearly matches one trained on 40 and
  label-efficient methods have no headroom to show; clinical CT differs across patients, scanners and protocols in
  the ways below, and the ranges stay within what clinical scans show. Per case, drawn from the case's seeded
  generator (standard value -> varied range):

  - contrast phase: HU (relative to water) of every enhancing structure (nominal HU in [-20, 300]: soft tissue,
    blood, urine, bile; fat, air, lung and bone keep theirs) x U(0.7, 1.6) (1 -> non-contrast to portal-venous-like,
    liver ~40-100 HU), times a per-structure exp(N(0, 0.12)) (organs enhance differently, as in arterial vs
    portal phases; each organ stays brighter than the fat or visceral background it sits in);
  - noise sd U(15, 25) -> U(10, 60) HU (dose, patient size, kernel); additive bias field U(3, 8) -> U(4, 20) HU and
    multiplicative U(0.003, 0.01) -> U(0.004, 0.025) (cupping, scatter);
  - calibration: offset 0 -> U(-10, 10) HU, gain about water 1 -> U(0.98, 1.02); point-spread function width
    (sigma 0.4, 0.4, 0.3 voxels) x 1 -> x U(1.0, 2.5) (reconstruction kernel, slice profile);
  - patient size (log sd per axis) 0.06, 0.06, 0.04 -> 0.10, 0.10, 0.07; rotation 1.5, 1.5, 4 -> 3, 3, 8 degrees;
    shift 0.03, 0.03, 0.05 -> 0.07, 0.07, 0.10 (field-of-view units); elastic amplitude 0.018 -> 0.025;
  - organ position jitter x 2.5 and size jitter x 2.0 (of each structure's ``jitter`` / ``scale_jitter``), for
    structures below 300 HU: the skeleton keeps the standard jitter, so a femoral head stays in its socket.

  Label maps, organ sets, geometry, absent classes and label/image consistency are as in the standard variant.

Unlabelled pool: the ``n_test`` test cases (``imagesTs``, no labels) come from the same distribution, so a large
``n_test`` makes a large unlabelled pool for semi-/self-supervised methods, e.g.
``medcl-phantom --out data/phantom_varied --variant varied --n 40 --n_test 200 --seed 0``.

Limits: the anatomy is a caricature (topology and relative positions are plausible, fine shape detail is not);
it is scaled to the field of view, so physical sizes are not anatomically faithful (a 64-voxel matrix at 1.6 mm
covers ~10 cm); contrast phases are a per-case scaling of the enhancing structures' HU (``"varied"``), not a
model of contrast kinetics; there are no streak/beam-hardening/metal artefacts, and the noise is
white rather than CT's correlated noise texture. Use it to test pipelines and compare methods relative to each
other, not to draw clinical conclusions.

Example::

    from medcl.data.phantom import generate_dataset
    path = generate_dataset("data/phantom", n=40, seed=0)   # -> data/phantom/dataset.json

or from a shell: ``medcl-phantom --out data/phantom --n 40 --seed 0`` (``--variant varied`` for wider
inter-subject variability, ``--n_test 200`` for a large unlabelled pool).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
from scipy import ndimage

from medcl.errors import MedclInputError

__all__ = [
    "Part",
    "Structure",
    "OrganSet",
    "ORGAN_SETS",
    "PhantomVariant",
    "PHANTOM_VARIANTS",
    "organ_labels",
    "generate_case",
    "generate_dataset",
    "main",
]

AIR_HU = -1000.0
_MIN_SIZE = 8


@dataclass(frozen=True)
class Part:
    """An inner part of a :class:`Structure` (e.g. renal sinus, gas in the rectum), confined to its parent.

    Attributes:
        scale: size as a fraction of the parent (superquadric radii, or tube radius).
        hu: nominal intensity (HU).
        offset: centre offset in the parent's local frame (units of the parent's radii; ignored along a tube).
        tex: texture amplitude (HU).
        label: label of the part; ``None`` inherits the parent's label, ``0`` makes it unlabelled.
        p_present: probability that the part is present in a case.
    """

    scale: float
    hu: float
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tex: float = 5.0
    label: int | None = None
    p_present: float = 1.0


@dataclass(frozen=True)
class Structure:
    """One structure of an organ set, in normalised field-of-view coordinates (see the module docstring).

    Attributes:
        name: unique name within the organ set.
        label: class index painted where the structure's occupancy is >= 0.5; 0 for unlabelled distractors.
        hu: nominal mean intensity (HU).
        center: centre ``(x, y, z)`` in ``[-1, 1]`` coordinates (x: right -> left, y: anterior -> posterior,
            z: inferior -> superior).
        radii: semi-axes of a superquadric (normalised units); a large value (e.g. 50) makes it infinite along
            that axis. Unused for tubes.
        exponent: superquadric exponent (2 = ellipsoid, larger = boxier).
        points: for a tube, polyline vertices relative to ``center``; empty for a superquadric.
        radius: tube radius (normalised units).
        rotation: base rotation in degrees about x, y, z.
        tex: texture amplitude (HU, standard deviation of the smoothed-noise texture).
        tex_fine: share of fine-scale texture in ``[0, 1]`` (the rest is coarse).
        hollow: if > 0, only a shell of this half-thickness (in implicit-function units: fraction of the radii
            for superquadrics, normalised units for tubes) around the surface is kept.
        stripes: ``(period, duty)``: keep only slabs along z (vertebrae, ribs), of the given period (normalised
            units) occupying ``duty`` of each period. The phase is shared by all striped structures of a case.
        clip: name of an earlier structure that bounds this one (occupancy = min of both).
        p_absent: probability that the structure is absent in a case.
        jitter: standard deviation of the centre jitter (normalised units).
        scale_jitter: standard deviation of the log size jitter, per axis.
        rot_jitter: standard deviation of the rotation jitter (degrees), per axis (halved about x and y).
        hu_jitter: standard deviation of the per-case intensity jitter (HU).
        parts: inner parts, painted right after the structure and confined to it.
    """

    name: str
    label: int
    hu: float
    center: tuple[float, float, float]
    radii: tuple[float, float, float] = (1.0, 1.0, 1.0)
    exponent: float = 2.0
    points: tuple[tuple[float, float, float], ...] = ()
    radius: float = 0.05
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tex: float = 8.0
    tex_fine: float = 0.5
    hollow: float = 0.0
    stripes: tuple[float, float] | None = None
    clip: str | None = None
    p_absent: float = 0.0
    jitter: float = 0.025
    scale_jitter: float = 0.07
    rot_jitter: float = 4.0
    hu_jitter: float = 4.0
    parts: tuple[Part, ...] = ()

    @property
    def is_tube(self) -> bool:
        """Whether the structure is a tube along ``points`` (else a superquadric)."""
        return len(self.points) > 0


@dataclass(frozen=True)
class OrganSet:
    """A table of structures with its label map.

    Attributes:
        name: organ-set name (key of :data:`ORGAN_SETS`).
        set_id: stable integer mixed into the random seed of each case.
        description: one-line description written to ``dataset.json``.
        labels: foreground class index -> name.
        structures: structures in painting order (later ones override earlier ones).
    """

    name: str
    set_id: int
    description: str
    labels: dict[int, str]
    structures: tuple[Structure, ...] = field(default_factory=tuple)


S = Structure  # short alias for the tables below

# Shared body layers and spine (x: right -> left, y: anterior -> posterior, z: inferior -> superior).
_SPINE = (
    S("disc_column", 0, 90.0, (0.0, 0.50, 0.0), (0.12, 0.11, 50.0), tex=10, jitter=0.015, rot_jitter=2.0),
    S(
        "vertebral_bodies",
        0,
        850.0,
        (0.0, 0.50, 0.0),
        (0.125, 0.115, 50.0),
        stripes=(0.5, 0.78),
        clip="disc_column",
        tex=30,
        jitter=0.0,
        rot_jitter=0.0,
        scale_jitter=0.0,
        hu_jitter=30.0,
        parts=(Part(0.8, 320.0, tex=40.0),),
    ),
    S("spinal_canal", 0, 15.0, (0.0, 0.675, 0.0), (0.05, 0.045, 50.0), tex=5, jitter=0.01, rot_jitter=2.0),
    S(
        "posterior_elements",
        0,
        650.0,
        (0.0, 0.69, 0.0),
        (0.085, 0.08, 50.0),
        hollow=0.3,
        stripes=(0.5, 0.6),
        tex=50,
        jitter=0.01,
        rot_jitter=2.0,
        hu_jitter=30.0,
    ),
)


def _body(rx: float, ry: float, cavity_hu: float, cavity_tex: float, cy: float = 0.04) -> tuple[Structure, ...]:
    """Body outline (subcutaneous fat), muscle wall shell and the textured inner cavity.

    Spelled with :class:`Structure`, not the table alias ``S``: the alias is deleted once the tables are built,
    and this function must keep working when called after import.
    """
    return (
        Structure("body", 0, -100.0, (0.0, cy, 0.0), (rx, ry, 50.0), exponent=2.3, tex=12, jitter=0.02, rot_jitter=2.0),
        Structure(
            "muscle_wall",
            0,
            50.0,
            (0.0, cy, 0.0),
            (rx - 0.08, ry - 0.08, 50.0),
            exponent=2.3,
            hollow=0.05,
            clip="body",
            tex=8,
            jitter=0.0,
            rot_jitter=0.0,
            scale_jitter=0.0,
        ),
        Structure(
            "cavity",
            0,
            cavity_hu,
            (0.0, cy, 0.0),
            (rx - 0.15, ry - 0.15, 50.0),
            exponent=2.3,
            tex=cavity_tex,
            tex_fine=0.3,
            jitter=0.0,
            rot_jitter=0.0,
            scale_jitter=0.0,
        ),
    )


_ABDOMEN = OrganSet(
    name="abdomen",
    set_id=1,
    description="Synthetic non-contrast abdominal CT phantom: liver, spleen, kidneys, pancreas",
    labels={1: "liver", 2: "spleen", 3: "kidneys", 4: "pancreas"},
    structures=_body(0.93, 0.78, cavity_hu=15.0, cavity_tex=18.0)
    + (
        S("paraspinal_left", 0, 50.0, (0.22, 0.70, 0.0), (0.13, 0.09, 50.0), tex=8),
        S("paraspinal_right", 0, 50.0, (-0.22, 0.70, 0.0), (0.13, 0.09, 50.0), tex=8),
        S("psoas_left", 0, 48.0, (0.17, 0.45, -0.6), (0.06, 0.07, 0.6), tex=8),
        S("psoas_right", 0, 48.0, (-0.17, 0.45, -0.6), (0.06, 0.07, 0.6), tex=8),
        S(
            "stomach",
            0,
            28.0,
            (0.28, -0.30, 0.45),
            (0.22, 0.18, 0.30),
            rotation=(0, 0, -20),
            tex=12,
            clip="cavity",
            parts=(Part(0.55, -900.0, offset=(0.0, -0.45, 0.35), tex=20.0, p_present=0.6),),
        ),
        S(
            "liver",
            1,
            60.0,
            (-0.38, -0.02, 0.35),
            (0.40, 0.50, 0.62),
            exponent=2.4,
            rotation=(0, 0, 10),
            tex=6,
            clip="cavity",
        ),
        S("gallbladder", 0, 5.0, (-0.28, -0.38, -0.12), (0.08, 0.10, 0.14), tex=4, p_absent=0.2, clip="cavity"),
        S("spleen", 2, 45.0, (0.52, 0.20, 0.42), (0.15, 0.23, 0.28), rotation=(0, 0, 30), tex=6, clip="cavity"),
        S(
            "kidney_left",
            3,
            150.0,
            (0.40, 0.30, -0.18),
            (0.13, 0.15, 0.30),
            rotation=(0, -8, -25),
            tex=10,
            p_absent=0.05,
            clip="cavity",
            parts=(Part(0.4, 20.0, offset=(-0.5, 0.0, 0.0), tex=5.0),),
        ),
        S(
            "kidney_right",
            3,
            150.0,
            (-0.40, 0.32, -0.32),
            (0.13, 0.15, 0.30),
            rotation=(0, 8, 25),
            tex=10,
            p_absent=0.05,
            clip="cavity",
            parts=(Part(0.4, 20.0, offset=(0.5, 0.0, 0.0), tex=5.0),),
        ),
        S(
            "pancreas",
            4,
            40.0,
            (0.10, 0.12, 0.05),
            (0.34, 0.09, 0.12),
            exponent=2.2,
            rotation=(0, -12, -18),
            tex=5,
            p_absent=0.10,
            clip="cavity",
        ),
        S("aorta", 0, 150.0, (0.06, 0.36, 0.0), (), points=((0.0, 0.0, -1.2), (0.0, 0.0, 1.2)), radius=0.07, tex=8),
        S("ivc", 0, 110.0, (-0.13, 0.30, 0.0), (), points=((0.0, 0.02, -1.2), (0.02, -0.04, 1.2)), radius=0.065, tex=8),
    )
    + _SPINE,
)

_PELVIS = OrganSet(
    name="pelvis",
    set_id=2,
    description="Synthetic male pelvic CT phantom: bladder, prostate, rectum, femoral heads",
    labels={1: "bladder", 2: "prostate", 3: "rectum", 4: "femoral_heads"},
    structures=_body(0.95, 0.72, cavity_hu=-40.0, cavity_tex=25.0, cy=0.02)
    + (
        S("gluteus_left", 0, 50.0, (0.45, 0.58, 0.2), (0.35, 0.18, 0.9), tex=8, clip="body"),
        S("gluteus_right", 0, 50.0, (-0.45, 0.58, 0.2), (0.35, 0.18, 0.9), tex=8, clip="body"),
        S("ilium_left", 0, 650.0, (0.55, 0.30, 0.65), (0.22, 0.08, 0.45), rotation=(0, 0, 35), tex=60),
        S("ilium_right", 0, 650.0, (-0.55, 0.30, 0.65), (0.22, 0.08, 0.45), rotation=(0, 0, -35), tex=60),
        S("sacrum", 0, 450.0, (0.0, 0.62, 0.45), (0.22, 0.10, 0.55), rotation=(-20, 0, 0), tex=60),
        S("obturator_left", 0, 52.0, (0.33, 0.05, -0.35), (0.08, 0.22, 0.3), tex=8),
        S("obturator_right", 0, 52.0, (-0.33, 0.05, -0.35), (0.08, 0.22, 0.3), tex=8),
        S(
            "femoral_neck_left",
            0,
            600.0,
            (0.52, 0.05, -0.5),
            (),
            points=((0.0, 0.0, 0.0), (0.25, 0.02, -0.7)),
            radius=0.09,
            tex=60,
        ),
        S(
            "femoral_neck_right",
            0,
            600.0,
            (-0.52, 0.05, -0.5),
            (),
            points=((0.0, 0.0, 0.0), (-0.25, 0.02, -0.7)),
            radius=0.09,
            tex=60,
        ),
        S("acetabulum_left", 0, 750.0, (0.55, 0.05, -0.45), (0.2, 0.2, 0.24), hollow=0.12, tex=60),
        S("acetabulum_right", 0, 750.0, (-0.55, 0.05, -0.45), (0.2, 0.2, 0.24), hollow=0.12, tex=60),
        S("femoral_head_left", 4, 450.0, (0.55, 0.05, -0.45), (0.15, 0.15, 0.18), tex=40, tex_fine=0.9),
        S("femoral_head_right", 4, 450.0, (-0.55, 0.05, -0.45), (0.15, 0.15, 0.18), tex=40, tex_fine=0.9),
        S("bladder", 1, 8.0, (0.0, -0.25, 0.05), (0.27, 0.24, 0.30), exponent=2.2, tex=4, clip="cavity"),
        S("prostate", 2, 40.0, (0.0, 0.02, -0.45), (0.13, 0.11, 0.16), tex=6, p_absent=0.10, clip="cavity"),
        S(
            "rectum",
            3,
            30.0,
            (0.0, 0.32, 0.0),
            (),
            points=((0.0, 0.0, -1.2), (0.0, -0.02, -0.2), (-0.04, 0.05, 0.5), (0.08, 0.08, 1.2)),
            radius=0.11,
            tex=12,
            clip="cavity",
            parts=(Part(0.5, 10.0, tex=40.0, p_present=0.5),),
        ),
        S("seminal_vesicles", 0, 30.0, (0.0, 0.12, -0.18), (0.2, 0.05, 0.06), tex=6, p_absent=0.10, clip="cavity"),
    ),
)

_THORAX = OrganSet(
    name="thorax",
    set_id=3,
    description="Synthetic contrast-enhanced chest CT phantom: heart, aorta, esophagus, trachea, lungs",
    labels={1: "heart", 2: "aorta", 3: "esophagus", 4: "trachea", 5: "lungs"},
    structures=_body(0.95, 0.75, cavity_hu=-60.0, cavity_tex=20.0)
    + (
        S("paraspinal_left", 0, 50.0, (0.22, 0.72, 0.0), (0.13, 0.09, 50.0), tex=8),
        S("paraspinal_right", 0, 50.0, (-0.22, 0.72, 0.0), (0.13, 0.09, 50.0), tex=8),
        S(
            "lung_right",
            5,
            -820.0,
            (-0.43, 0.05, 0.12),
            (0.32, 0.55, 0.90),
            exponent=2.4,
            tex=45,
            tex_fine=0.9,
            clip="cavity",
        ),
        S(
            "lung_left",
            5,
            -820.0,
            (0.45, 0.05, 0.12),
            (0.30, 0.55, 0.90),
            exponent=2.4,
            tex=45,
            tex_fine=0.9,
            clip="cavity",
        ),
        S(
            "heart",
            1,
            100.0,
            (0.12, -0.22, -0.42),
            (0.33, 0.34, 0.42),
            rotation=(0, 10, 25),
            tex=8,
            clip="cavity",
            parts=(Part(0.6, 140.0, offset=(0.1, 0.0, 0.0), tex=6.0),),
        ),
        S(
            "aorta",
            2,
            170.0,
            (0.0, 0.0, 0.0),
            (),
            points=((0.02, -0.12, -0.25), (0.02, -0.12, 0.5), (0.1, 0.12, 0.72), (0.2, 0.32, 0.5), (0.18, 0.34, -1.2)),
            radius=0.08,
            tex=8,
        ),
        S(
            "esophagus",
            3,
            35.0,
            (0.0, 0.0, 0.0),
            (),
            points=((0.04, 0.22, 1.2), (0.06, 0.23, 0.0), (0.14, 0.12, -1.2)),
            radius=0.065,
            tex=6,
            p_absent=0.05,
        ),
        S(
            "bronchus_right",
            0,
            -950.0,
            (0.0, 0.0, 0.0),
            (),
            points=((0.0, 0.05, 0.22), (-0.32, 0.08, -0.08)),
            radius=0.04,
            tex=10,
            jitter=0.01,
        ),
        S(
            "bronchus_left",
            0,
            -950.0,
            (0.0, 0.0, 0.0),
            (),
            points=((0.0, 0.05, 0.22), (0.32, 0.08, -0.12)),
            radius=0.04,
            tex=10,
            jitter=0.01,
        ),
        S(
            "trachea",
            4,
            -950.0,
            (0.0, 0.0, 0.0),
            (),
            points=((0.0, 0.0, 1.2), (0.0, 0.05, 0.22)),
            radius=0.075,
            tex=10,
            jitter=0.01,
        ),
        S(
            "ribs",
            0,
            700.0,
            (0.0, 0.04, 0.0),
            (0.87, 0.70, 50.0),
            exponent=2.3,
            hollow=0.035,
            stripes=(0.32, 0.35),
            clip="body",
            tex=60,
            jitter=0.0,
            rot_jitter=0.0,
            scale_jitter=0.0,
        ),
    )
    + _SPINE,
)

del S

ORGAN_SETS: dict[str, OrganSet] = {s.name: s for s in (_ABDOMEN, _PELVIS, _THORAX)}
"""Organ-set name -> :class:`OrganSet` (label map and structure table)."""


@dataclass(frozen=True)
class PhantomVariant:
    """The per-case random ranges of a phantom variant, a row of :data:`PHANTOM_VARIANTS` (see the module docstring).

    ``(lo, hi)`` pairs are uniform ranges and ``*_sd`` standard deviations of normal draws; ``position_factor``
    and ``size_factor`` multiply the per-structure jitters of the organ-set tables (:class:`Structure`). The extras
    (``contrast``, ``organ_contrast_sd``, ``offset_hu``, ``gain``, ``psf_factor``) are drawn from the case's
    generator only where the range is not a single value (a non-zero sd), after the standard draws: the standard
    variant draws exactly the random numbers it drew before variants existed.

    Attributes:
        name: variant name (key of :data:`PHANTOM_VARIANTS`).
        patient_scale_sd: log patient size, per axis (x, y, z).
        patient_rot_sd: patient rotation (degrees) about x, y, z.
        patient_shift_sd: patient position (normalised field-of-view units), per axis.
        elastic_amp: amplitude of each plane wave of the smooth displacement field (normalised units).
        position_factor: multiplies the centre jitter (:attr:`Structure.jitter`) of every soft-tissue, fluid or
            air structure (nominal HU below ``rigid_hu``).
        size_factor: multiplies the log size jitter (:attr:`Structure.scale_jitter`) of the same structures.
        rigid_hu: structures at or above this nominal HU (bone) keep the tables' jitter: the skeleton stays
            rigid and in place (a femoral head stays in its acetabulum, vertebrae stay stacked).
        bias_add_hu: amplitude of the additive bias field (HU).
        bias_mul: amplitude of the multiplicative bias field (relative to the attenuation, HU + 1000).
        noise_sd_hu: standard deviation of the white noise (HU).
        contrast: per-case enhancement (contrast phase) factor: the HU of every enhancing structure (relative to
            water, 0 HU) is multiplied by it; 1 = nominal intensities.
        organ_contrast_sd: per-structure log factor on top of ``contrast`` (organs enhance differently in each
            case, as in arterial vs portal-venous phases).
        enhancing_hu: nominal-HU window of the structures that enhance (soft tissue, blood, urine, bile); fat,
            air, lung and bone keep their HU.
        offset_hu: global intensity offset (HU), scanner calibration.
        gain: global intensity scale about water (0 HU), scanner calibration.
        psf_factor: multiplies the point-spread function's width (Gaussian sigma 0.4, 0.4, 0.3 voxels).
    """

    name: str
    patient_scale_sd: tuple[float, float, float]
    patient_rot_sd: tuple[float, float, float]
    patient_shift_sd: tuple[float, float, float]
    elastic_amp: float
    position_factor: float
    size_factor: float
    rigid_hu: float
    bias_add_hu: tuple[float, float]
    bias_mul: tuple[float, float]
    noise_sd_hu: tuple[float, float]
    contrast: tuple[float, float]
    organ_contrast_sd: float
    enhancing_hu: tuple[float, float]
    offset_hu: tuple[float, float]
    gain: tuple[float, float]
    psf_factor: tuple[float, float]


PHANTOM_VARIANTS: dict[str, PhantomVariant] = {
    "standard": PhantomVariant(
        name="standard",
        patient_scale_sd=(0.06, 0.06, 0.04),
        patient_rot_sd=(1.5, 1.5, 4.0),
        patient_shift_sd=(0.03, 0.03, 0.05),
        elastic_amp=0.018,
        position_factor=1.0,
        size_factor=1.0,
        rigid_hu=300.0,
        bias_add_hu=(3.0, 8.0),
        bias_mul=(0.003, 0.01),
        noise_sd_hu=(15.0, 25.0),
        contrast=(1.0, 1.0),
        organ_contrast_sd=0.0,
        enhancing_hu=(-20.0, 300.0),
        offset_hu=(0.0, 0.0),
        gain=(1.0, 1.0),
        psf_factor=(1.0, 1.0),
    ),
    "varied": PhantomVariant(
        name="varied",
        patient_scale_sd=(0.10, 0.10, 0.07),
        patient_rot_sd=(3.0, 3.0, 8.0),
        patient_shift_sd=(0.07, 0.07, 0.10),
        elastic_amp=0.025,
        position_factor=2.5,
        size_factor=2.0,
        rigid_hu=300.0,
        bias_add_hu=(4.0, 20.0),
        bias_mul=(0.004, 0.025),
        noise_sd_hu=(10.0, 60.0),
        contrast=(0.7, 1.6),
        organ_contrast_sd=0.12,
        enhancing_hu=(-20.0, 300.0),
        offset_hu=(-10.0, 10.0),
        gain=(0.98, 1.02),
        psf_factor=(1.0, 2.5),
    ),
}
"""Variant name -> :class:`PhantomVariant`: the frozen per-case ranges of each phantom variant."""

_VARIED_NOTE = "varied variant: per-case contrast phase, noise, bias field, calibration, blur, organ size and position"


def _get_variant(variant: str) -> PhantomVariant:
    if not isinstance(variant, str) or variant.lower() not in PHANTOM_VARIANTS:
        raise MedclInputError(f"unknown variant {variant!r}; valid variants: {', '.join(PHANTOM_VARIANTS)}")
    return PHANTOM_VARIANTS[variant.lower()]


def _get_organ_set(organ_set: str) -> OrganSet:
    if not isinstance(organ_set, str) or organ_set.lower() not in ORGAN_SETS:
        raise MedclInputError(f"unknown organ_set {organ_set!r}; valid organ sets: {', '.join(sorted(ORGAN_SETS))}")
    return ORGAN_SETS[organ_set.lower()]


def organ_labels(organ_set: str = "abdomen") -> dict[int, str]:
    """Label map of an organ set, background included.

    Args:
        organ_set: name of the organ set (a key of :data:`ORGAN_SETS`).

    Returns:
        class index -> name, e.g. ``{0: "background", 1: "liver", 2: "spleen", 3: "kidneys", 4: "pancreas"}``.

    Raises:
        ValueError: (:class:`medcl.errors.MedclInputError`) for an unknown organ set, listing the valid ones.
    """
    return {0: "background", **_get_organ_set(organ_set).labels}


def _parse_shape(shape) -> tuple[int, int, int]:
    """Accept ``(64, 64, 48)``, ``[64, 64, 48]``, ``"64,64,48"``, ``"[64, 64, 48]"`` or ``"64x64x48"``."""
    orig = shape
    if isinstance(shape, str):
        tokens = [t for t in re.split(r"[\s,x×\[\]\(\)]+", shape.strip().lower()) if t]
        try:
            shape = [int(t) for t in tokens]
        except ValueError:
            shape = None
    try:
        dims = [int(s) for s in shape] if shape is not None and not isinstance(shape, (int, float)) else None
        if dims is not None and any(float(s) != int(s) for s in shape):
            dims = None
    except (TypeError, ValueError):
        dims = None
    if dims is None or len(dims) != 3 or any(d < 1 for d in dims):
        raise MedclInputError(f"shape must be 3 positive integers like 64,64,48 (got {orig!r})")
    if any(d < _MIN_SIZE for d in dims):
        raise MedclInputError(f"shape must be at least {_MIN_SIZE} voxels along each axis (got {tuple(dims)})")
    return tuple(dims)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MedclInputError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return int(value)


def _rotation(deg: np.ndarray) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in degrees about x, y, z."""
    ax, ay, az = np.deg2rad(deg)
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _dot(vec: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``sum_i vec[i] * field[i]`` for a (3, X, Y, Z) field (faster than tensordot for 3 components)."""
    out = field[0] * np.float32(vec[0])
    out += field[1] * np.float32(vec[1])
    out += field[2] * np.float32(vec[2])
    return out


def _affine_field(mat: np.ndarray, field: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``mat @ field + offset`` applied to every voxel of a (3, X, Y, Z) coordinate field."""
    out = np.empty_like(field)
    for i in range(3):
        out[i] = _dot(mat[i], field)
        out[i] += np.float32(offset[i])
    return out


def _waves(rng: np.random.Generator, k: int, freq: tuple[float, float], amp: float, ncomp: int) -> list[tuple]:
    """Random plane waves ``(amplitudes[ncomp], direction[3], angular frequency, phase)``."""
    out = []
    for _ in range(k):
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d) + 1e-12
        out.append((rng.standard_normal(ncomp) * amp, d, rng.uniform(*freq), rng.uniform(0, 2 * np.pi)))
    return out


def _eval_waves(waves: list[tuple], p: np.ndarray, ncomp: int) -> np.ndarray:
    out = np.zeros((ncomp,) + p.shape[1:], dtype=np.float32)
    for a, d, w, phi in waves:
        s = np.sin(_dot(d, p) * np.float32(w) + np.float32(phi))
        for c in range(ncomp):
            out[c] += np.float32(a[c]) * s
    return out


def _superquadric(q: np.ndarray, exponent: float) -> np.ndarray:
    """Implicit function ``(sum |q_i|^e)^(1/e) - 1`` (negative inside)."""
    if exponent == 2.0:
        return np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) - 1.0
    a = np.abs(q)
    # normalise by the largest coordinate to avoid overflow for big exponents
    m = np.maximum(a.max(axis=0), 1e-6)
    return m * np.power(np.sum(np.power(a / m, exponent), axis=0), 1.0 / exponent) - 1.0


def _tube(q: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """Implicit function: distance to the polyline minus the radius."""
    best = None
    for a, b in pairwise(points):
        ab = (b - a).astype(np.float32)
        rel = q - a.astype(np.float32)[:, None, None, None]
        t = np.clip(_dot(ab / (ab @ ab + 1e-12), rel), 0.0, 1.0)
        d2 = np.sum((rel - ab[:, None, None, None] * t) ** 2, axis=0)
        best = d2 if best is None else np.minimum(best, d2)
    return np.sqrt(best) - np.float32(radius)


def _occupancy(f: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy in [0, 1]: a one-voxel linear ramp of the signed distance ``f / |grad f|``.

    ``occupancy >= 0.5`` exactly where ``f <= 0``.
    """
    g = np.gradient(f)
    norm = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) + np.float32(1e-6)
    occ = np.clip(0.5 - f / norm, 0.0, 1.0)
    occ[f <= 0] = np.maximum(occ[f <= 0], 0.5)  # guard the label threshold against gradient round-off
    return occ.astype(np.float32, copy=False)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: tuple[float, ...]) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return (t / (t.std() + 1e-6)).astype(np.float32)


@dataclass
class _Case:
    """The random parameters of one case (drawn by :func:`_draw_case` before any shape-dependent array)."""

    s_inplane: float
    s_slice: float
    origin_jitter: np.ndarray
    table_z: float
    g_scale: np.ndarray
    g_rot: np.ndarray
    g_shift: np.ndarray
    elastic: list
    bias_add: list
    bias_mul: list
    bias_add_amp: float
    bias_mul_amp: float
    noise_sd: float
    stripe_phase: float
    per_structure: list  # (8 normals, 1 + len(parts) uniforms) per structure
    enhancement: np.ndarray  # per structure: factor of its HU (relative to water) if it enhances
    offset_hu: float
    gain: float
    psf_factor: float


def _draw_range(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A uniform draw in ``bounds``; a single value (``lo == hi``) is returned without drawing."""
    lo, hi = bounds
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def _draw_case(rng: np.random.Generator, spec: OrganSet, var: PhantomVariant) -> _Case:
    """Draw a case's parameters, in the order the standard phantom always drew them, then the variant's extras."""
    s_inplane = rng.uniform(1.4, 1.8)
    s_slice = rng.uniform(2.0, 3.0)
    origin_jitter = rng.normal(0.0, [5.0, 5.0, 20.0])
    table_z = rng.uniform(-300.0, 100.0)
    g_scale = np.exp(rng.normal(0.0, var.patient_scale_sd))  # patient size (per axis)
    g_rot = rng.normal(0.0, var.patient_rot_sd)
    g_shift = rng.normal(0.0, var.patient_shift_sd)
    elastic = _waves(rng, 6, (1.5, 3.5), var.elastic_amp, 3)
    bias_add = _waves(rng, 3, (0.4, 1.4), 1.0, 1)
    bias_mul = _waves(rng, 3, (0.4, 1.4), 1.0, 1)
    bias_add_amp = rng.uniform(*var.bias_add_hu)  # HU
    bias_mul_amp = rng.uniform(*var.bias_mul)  # relative to attenuation (HU + 1000)
    noise_sd = rng.uniform(*var.noise_sd_hu)
    stripe_phase = rng.uniform(0.0, 2.0 * np.pi)
    per_structure = [(rng.standard_normal(8), rng.random(1 + len(st.parts))) for st in spec.structures]
    # variant extras: drawn only where a range is not a single value (the standard variant draws none of them)
    enhancement = np.full(len(spec.structures), _draw_range(rng, var.contrast))
    if var.organ_contrast_sd > 0:
        enhancement *= np.exp(rng.normal(0.0, var.organ_contrast_sd, len(spec.structures)))
    offset_hu = _draw_range(rng, var.offset_hu)
    gain = _draw_range(rng, var.gain)
    psf_factor = _draw_range(rng, var.psf_factor)
    return _Case(
        s_inplane, s_slice, origin_jitter, table_z, g_scale, g_rot, g_shift, elastic, bias_add, bias_mul,
        bias_add_amp, bias_mul_amp, noise_sd, stripe_phase, per_structure, enhancement, offset_hu, gain, psf_factor,
    )  # fmt: skip


def _coordinates(shape: tuple[int, int, int], case: _Case) -> tuple[np.ndarray, np.ndarray]:
    """Voxel centres ``u`` in [-1, 1] and the anatomy coordinates ``p`` (patient transform, elastic deformation)."""
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n) * 2.0 - 1.0 for n in shape]
    u = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, X, Y, Z)
    rg = _rotation(case.g_rot).astype(np.float32)
    p = _affine_field(rg.T, u, -rg.T @ case.g_shift)
    p /= case.g_scale.astype(np.float32)[:, None, None, None]
    p += _eval_waves(case.elastic, p, 3)
    return u, p


def _enhance(hu: float, nominal: float, factor: float, window: tuple[float, float]) -> float:
    """Contrast enhancement: ``hu * factor`` (relative to water, 0 HU) if ``nominal`` is in the enhancing window."""
    return hu * factor if window[0] <= nominal <= window[1] else hu


def _structure_field(st: Structure, nrm: np.ndarray, p: np.ndarray, var: PhantomVariant, stripe_phase: float):
    """Implicit function of a structure (negative inside), its local coordinates ``q`` and tube points."""
    soft = st.hu < var.rigid_hu  # bone keeps the organ-set table's jitter
    center = np.asarray(st.center, dtype=np.float64) + nrm[0:3] * (st.jitter * (var.position_factor if soft else 1.0))
    scale = np.exp(nrm[3:6] * (st.scale_jitter * (var.size_factor if soft else 1.0)))
    rot = np.asarray(st.rotation, dtype=np.float64) + nrm[6] * st.rot_jitter * np.array([0.5, 0.5, 1.0])
    r = _rotation(rot)
    size = np.ones(3) if st.is_tube else np.asarray(st.radii, dtype=np.float64)
    inv = r.T / (size * scale)[:, None]
    q = _affine_field(inv, p, -inv @ center)
    pts = np.asarray(st.points, dtype=np.float64)
    f = _tube(q, pts, st.radius) if st.is_tube else _superquadric(q, st.exponent)
    if st.hollow > 0:
        f = np.abs(f) - np.float32(st.hollow)
    if st.stripes is not None:
        period, duty = st.stripes
        theta = p[2] * np.float32(2.0 * np.pi / period) + np.float32(stripe_phase)
        f_stripe = (np.float32(np.cos(np.pi * duty)) - np.cos(theta)) * np.float32(period / (2.0 * np.pi))
        f = np.maximum(f, f_stripe)
    return f, q, pts


def _part_occupancy(st: Structure, part: Part, q: np.ndarray, pts: np.ndarray, occ: np.ndarray) -> np.ndarray:
    qp = q - np.asarray(part.offset, dtype=np.float32)[:, None, None, None]
    if st.is_tube:
        fp = _tube(qp, pts, st.radius * part.scale)
    else:
        fp = _superquadric(qp / np.float32(part.scale), st.exponent)
    return np.minimum(_occupancy(fp.astype(np.float32, copy=False)), occ)


def _render(spec: OrganSet, case: _Case, var: PhantomVariant, p: np.ndarray, textures: tuple[np.ndarray, np.ndarray]):
    """Paint the structures in order: the noiseless image (HU), the label map and each structure's occupancy."""
    tex_fine, tex_coarse = textures
    image = np.full(p.shape[1:], AIR_HU, dtype=np.float32)
    label = np.zeros(p.shape[1:], dtype=np.uint8)
    occupancies: dict[str, np.ndarray] = {}

    def paint(occ: np.ndarray, hu: float, tex: float, fine: float, lab: int) -> None:
        value = np.float32(hu) + np.float32(tex) * (
            np.float32(fine) * tex_fine + np.float32(np.sqrt(max(0.0, 1.0 - fine * fine))) * tex_coarse
        )
        image[...] = image * (1.0 - occ) + occ * value
        label[occ >= 0.5] = lab

    for st, (nrm, uni), factor in zip(spec.structures, case.per_structure, case.enhancement, strict=True):
        if uni[0] < st.p_absent:
            continue
        f, q, pts = _structure_field(st, nrm, p, var, case.stripe_phase)
        occ = _occupancy(f.astype(np.float32, copy=False))
        if st.clip is not None and st.clip in occupancies:
            occ = np.minimum(occ, occupancies[st.clip])
        occupancies[st.name] = occ
        hu = st.hu + nrm[7] * st.hu_jitter
        paint(occ, _enhance(hu, st.hu, factor, var.enhancing_hu), st.tex, st.tex_fine, st.label)
        for part, u_part in zip(st.parts, uni[1:], strict=True):
            if u_part >= part.p_present:
                continue
            part_hu = _enhance(part.hu + (hu - st.hu), part.hu, factor, var.enhancing_hu)
            part_label = st.label if part.label is None else part.label
            paint(_part_occupancy(st, part, q, pts, occ), part_hu, part.tex, 0.7, part_label)
    return image, label, occupancies


def _form_image(image: np.ndarray, case: _Case, u: np.ndarray, body: np.ndarray | None, noise: np.ndarray):
    """Point-spread function, bias field, noise, calibration (offset and gain about water), clipping."""
    psf = (0.4 * case.psf_factor, 0.4 * case.psf_factor, 0.3 * case.psf_factor)  # sigma (voxels)
    image = ndimage.gaussian_filter(image, psf, mode="nearest")
    add = _eval_waves(case.bias_add, u, 1)[0] * np.float32(case.bias_add_amp / np.sqrt(len(case.bias_add)))
    mul = 1.0 + _eval_waves(case.bias_mul, u, 1)[0] * np.float32(case.bias_mul_amp / np.sqrt(len(case.bias_mul)))
    if body is not None:
        add *= body
    image = (image - AIR_HU) * mul + AIR_HU + add + noise * np.float32(case.noise_sd)
    if case.gain != 1.0 or case.offset_hu != 0.0:
        image = image * np.float32(case.gain) + np.float32(case.offset_hu)
    return np.clip(image, -1024.0, 3071.0).astype(np.float32)


def _case_affine(shape: tuple[int, int, int], case: _Case) -> np.ndarray:
    """LPS-style DICOM/ITK geometry written as RAS NIfTI: ``diag(-sx, -sy, sz)`` plus an origin near the centre."""
    sx = sy = float(case.s_inplane)
    sz = float(case.s_slice)
    n = np.asarray(shape, dtype=np.float64)
    origin_lps = np.array(
        [
            -sx * (n[0] - 1) / 2.0 + case.origin_jitter[0],
            -sy * (n[1] - 1) / 2.0 + case.origin_jitter[1],
            case.table_z + case.origin_jitter[2],
        ]
    )
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return affine


def generate_case(
    index: int,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 48),
    organ_set: str = "abdomen",
    variant: str = "standard",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one phantom case (image in HU, label map, affine).

    The case depends only on ``(seed, index, organ_set, variant)`` (random generator
    ``np.random.default_rng([seed, index, set_id])``), not on how many other cases are generated or in which order.
    The random anatomy parameters are drawn before any shape-dependent array, so the same case rendered at another
    ``shape`` has the same anatomy (textures and noise differ).

    Args:
        index: case index (>= 0).
        seed: dataset seed (>= 0).
        shape: array shape ``(X, Y, Z)``, at least 8 voxels per axis; Z is the slice axis.
        organ_set: name of the organ set, a key of :data:`ORGAN_SETS` (``"abdomen"``, ``"pelvis"``, ``"thorax"``).
        variant: ``"standard"`` (default) or ``"varied"`` (wider inter-subject variability), a key of
            :data:`PHANTOM_VARIANTS`.

    Returns:
        ``(image, label, affine)``: ``image`` float32 HU of shape ``shape`` (air about -1000, clipped to
        [-1024, 3071]); ``label`` uint8 with values in ``organ_labels(organ_set)``; ``affine`` float64 4x4,
        ``diag(-sx, -sy, sz)`` with in-plane spacing in [1.4, 1.8] mm and slice spacing in [2.0, 3.0] mm.

    Raises:
        ValueError: (:class:`medcl.errors.MedclInputError`) for a negative index/seed, a bad shape, an unknown
            organ set or an unknown variant.
    """
    spec = _get_organ_set(organ_set)
    var = _get_variant(variant)
    index = _check_int(index, "index", 0)
    seed = _check_int(seed, "seed", 0)
    shape = _parse_shape(shape)
    rng = np.random.default_rng([seed, index, spec.set_id])
    case = _draw_case(rng, spec, var)
    u, p = _coordinates(shape, case)
    # shape-dependent random fields (drawn after all scalar parameters)
    zr = case.s_inplane / case.s_slice
    tex_fine = _smooth_noise(rng, shape, (0.8, 0.8, 0.8 * zr))
    tex_coarse = _smooth_noise(rng, shape, (2.5, 2.5, 2.5 * zr))
    noise = rng.standard_normal(shape, dtype=np.float32)
    image, label, occupancies = _render(spec, case, var, p, (tex_fine, tex_coarse))
    image = _form_image(image, case, u, occupancies.get("body"), noise)
    return image, label, _case_affine(shape, case)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _prefix(name: str) -> str:
    prefix = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return prefix or "case"


def generate_dataset(
    out_dir: str,
    n: int = 40,
    n_test: int = 4,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 48),
    organ_set: str = "abdomen",
    name: str | None = None,
    variant: str = "standard",
) -> str:
    """Write a phantom dataset in MSD layout and return the path of its ``dataset.json``.

    Layout: ``imagesTr/<prefix>_XXX.nii.gz`` and ``labelsTr/<prefix>_XXX.nii.gz`` for the ``n`` training cases
    (indices ``0 .. n-1``), ``imagesTs/<prefix>_XXX.nii.gz`` for the ``n_test`` test cases (indices continue after
    the training cases; no labels written), and ``dataset.json`` with the MSD keys (``name``, ``description``,
    ``reference``, ``licence``, ``release``, ``tensorImageSize``, ``modality``, ``labels``, ``numTraining``,
    ``numTest``, ``training``, ``test``) plus ``medcl_phantom`` (generator settings). ``<prefix>`` is ``name``
    lower-cased with non-alphanumerics replaced by ``_``. Images are int16 HU, labels uint8, both with the same
    affine written as qform and sform (code 1). Existing files with the same names are overwritten.

    The test cases are a pool of unlabelled images from the same distribution: a large ``n_test`` (e.g. 200) makes
    the unlabelled pool of a semi-supervised or self-supervised run, at no labelling cost.

    Args:
        out_dir: output folder (created if needed).
        n: number of labelled training cases (>= 1).
        n_test: number of unlabelled test cases (>= 0).
        seed: dataset seed (>= 0); case ``i`` is ``generate_case(i, seed, shape, organ_set, variant)``.
        shape: array shape ``(X, Y, Z)`` (3 integers >= 8; also ``"64,64,48"``).
        organ_set: ``"abdomen"`` (default), ``"pelvis"`` or ``"thorax"`` (see :data:`ORGAN_SETS`).
        name: dataset name; defaults to ``"Phantom<OrganSet>"`` (e.g. ``"PhantomAbdomen"``).
        variant: ``"standard"`` (default) or ``"varied"`` (wider inter-subject variability; see
            :data:`PHANTOM_VARIANTS`); recorded as ``medcl_phantom["variant"]`` in ``dataset.json``.

    Returns:
        path of the written ``dataset.json``; it loads with
        ``monai.data.load_decathlon_datalist(path, True, "training")`` (and ``"test"`` when ``n_test > 0``).

    Raises:
        ValueError: (:class:`medcl.errors.MedclInputError`) for an unknown organ set or variant, ``n < 1``,
            ``n_test < 0``, a negative seed or a bad shape.
    """
    spec = _get_organ_set(organ_set)
    var = _get_variant(variant)
    n = _check_int(n, "n", 1)
    n_test = _check_int(n_test, "n_test", 0)
    seed = _check_int(seed, "seed", 0)
    shape = _parse_shape(shape)
    if name is None:
        name = f"Phantom{spec.name.capitalize()}"
    name = str(name)
    prefix = _prefix(name)

    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    training, test = [], []
    for i in range(n + n_test):
        image, label, affine = generate_case(i, seed=seed, shape=shape, organ_set=spec.name, variant=var.name)
        fname = f"{prefix}_{i:03d}.nii.gz"
        image_i16 = np.round(image).astype(np.int16)
        if i < n:
            _save_nifti(image_i16, affine, os.path.join(out_dir, "imagesTr", fname))
            _save_nifti(label, affine, os.path.join(out_dir, "labelsTr", fname))
            training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
        else:
            _save_nifti(image_i16, affine, os.path.join(out_dir, "imagesTs", fname))
            test.append(f"./imagesTs/{fname}")

    meta = {
        "name": name,
        "description": spec.description if var.name == "standard" else f"{spec.description}; {_VARIED_NOTE}",
        "reference": "medcl synthetic phantom (medcl.data.phantom); no patient data",
        "licence": "CC0-1.0 (synthetic data)",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in organ_labels(spec.name).items()},
        "numTraining": n,
        "numTest": n_test,
        "training": training,
        "test": test,
        "medcl_phantom": {
            "organ_set": spec.name,
            "seed": seed,
            "shape": list(shape),
            "variant": var.name,
            "version": 1,
        },
    }
    path = os.path.join(out_dir, "dataset.json")
    with open(path, "w") as fh:
        json.dump(meta, fh, indent=2)
    return path


def _cli(
    out: str = "data/phantom",
    n: int = 40,
    n_test: int = 4,
    seed: int = 0,
    shape=(64, 64, 48),
    organ_set: str = "abdomen",
    name: str | None = None,
    variant: str = "standard",
) -> None:
    """Generate a synthetic CT phantom dataset in MSD layout.

    Args:
        out: output folder.
        n: number of labelled training cases.
        n_test: number of unlabelled test cases (imagesTs; e.g. 200 for a large unlabelled pool).
        seed: dataset seed.
        shape: volume shape, e.g. 64,64,48 or "[64,64,48]".
        organ_set: abdomen, pelvis or thorax.
        name: dataset name (default Phantom<OrganSet>).
        variant: standard, or varied (wider inter-subject variability of contrast, noise, bias, size, position).
    """
    t0 = time.perf_counter()
    path = generate_dataset(
        out, n=n, n_test=n_test, seed=seed, shape=shape, organ_set=organ_set, name=name, variant=variant
    )
    labels = organ_labels(organ_set)
    names = ", ".join(f"{k}={v}" for k, v in labels.items() if k)
    print(
        f"medcl-phantom: wrote {path} ({n} training + {n_test} test cases, {organ_set.lower()}, "
        f"{_get_variant(variant).name} variant, shape {tuple(_parse_shape(shape))}, labels {names}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``medcl-phantom`` (also ``python -m medcl.data.phantom``), parsed with ``fire``.

    Example: ``medcl-phantom --out data/phantom --n 40 --n_test 4 --seed 0 --shape 64,64,48 --organ_set abdomen``;
    ``--variant varied`` for the variant with wider inter-subject variability.

    Args:
        argv: arguments (without the program name); ``None`` reads ``sys.argv``.

    Raises:
        ValueError: (:class:`medcl.errors.MedclInputError`) for invalid arguments.
    """
    import fire

    fire.Fire(_cli, command=None if argv is None else list(argv), name="medcl-phantom")


if __name__ == "__main__":
    main()
