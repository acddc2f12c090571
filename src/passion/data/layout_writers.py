"""Writing cases in the raw layouts that layouts.py reads (phantoms for tests, demos and exports).

BraTS-like specs get each layout's real conventions, so that reading them back exercises the name
mapping: the MSD Task01_BrainTumour channel order and labels (1 edema, 2 non-enhancing, 3 enhancing),
nnU-Net's own BraTS conversion channel order. Other specs use their own names and class indices.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils import PassionError, atomic_write_json
from .layouts import LAYOUTS, map_onto
from .nifti import write_label_map, write_nifti
from .spec import DatasetSpec

MSD_BRAIN_CHANNELS = ("FLAIR", "T1w", "t1gd", "T2w")
MSD_BRAIN_LABELS = {"background": [0], "edema": [1], "non-enhancing tumor": [2], "enhancing tumour": [3]}
NNUNET_BRATS_CHANNELS = ("T1", "T1ce", "T2", "Flair")


@dataclass
class LayoutWriter:
    out: Path
    layout: str
    spec: DatasetSpec
    channels: tuple[str, ...]  # modality of each file channel
    channel_names: tuple[str, ...]  # as dataset.json names them
    label_names: dict[str, list[int]]  # dataset.json labels: name -> [file value]
    file_values: dict[int, int]  # spec raw value -> value written

    def write_case(self, name: str, images: dict[str, np.ndarray], seg: np.ndarray, affine: np.ndarray,
                   available: list[bool]) -> None:
        """One case; `seg` holds the spec's raw values; modalities not available get no file
        (an all-zero channel in a 4D image)."""
        keep = dict(zip(self.spec.modalities, available))
        if self.layout == "brats":
            self._write_brats(name, images, seg, affine, keep)
            return
        labels = np.zeros(seg.shape, dtype=np.int32)
        for raw, value in self.file_values.items():
            labels[seg == raw] = value
        if self.layout == "msd":
            stack = np.stack([images[m] if keep[m] else np.zeros_like(images[m]) for m in self.channels], axis=-1)
            write_nifti(self.out / "imagesTr" / f"{name}.nii.gz", stack, affine, dtype=np.float32)
        else:
            for c, m in enumerate(self.channels):
                if keep[m]:
                    write_nifti(self.out / "imagesTr" / f"{name}_{c:04d}.nii.gz", images[m], affine, dtype=np.float32)
        write_label_map(self.out / "labelsTr" / f"{name}.nii.gz", labels, affine)

    def _write_brats(self, name, images, seg, affine, keep) -> None:
        """Into a hidden folder, then moved in place: no half-written case folders."""
        tmp = self.out / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        sep = self.spec.file_separator
        try:
            for modality, suffix in zip(self.spec.modalities, self.spec.suffixes):
                if keep[modality]:
                    write_nifti(tmp / f"{name}{sep}{suffix}.nii.gz", images[modality], affine, dtype=np.float32)
            write_label_map(tmp / f"{name}{sep}{self.spec.label_suffix}.nii.gz", seg, affine)
            final = self.out / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def finish(self, names: list[str]) -> None:
        """dataset.json, written last (a folder without it is not yet a dataset)."""
        if self.layout == "brats":
            return
        if self.layout == "msd":
            meta = {"name": self.spec.name, "tensorImageSize": "4D",
                    "modality": {str(i): n for i, n in enumerate(self.channel_names)},
                    "labels": {str(v[0]): n for n, v in self.label_names.items()},
                    "numTraining": len(names), "numTest": 0,
                    "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
                    "test": []}
        else:
            meta = {"name": self.spec.name, "channel_names": {str(i): n for i, n in enumerate(self.channel_names)},
                    "labels": {n: v[0] for n, v in self.label_names.items()},
                    "numTraining": len(names), "file_ending": ".nii.gz"}
        atomic_write_json(self.out / "dataset.json", meta)


def layout_writer(out: str | Path, layout: str, spec: DatasetSpec) -> LayoutWriter:
    if layout not in LAYOUTS:
        raise PassionError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    known = {"msd": (MSD_BRAIN_CHANNELS, MSD_BRAIN_LABELS), "nnunet": (NNUNET_BRATS_CHANNELS, None)}.get(layout)
    mapped = map_onto(spec, list(known[0]), known[1])[0] if known else None
    if mapped is not None and known[1] is not None and len(known[1]) != spec.num_classes:
        mapped = None
    if mapped is not None:
        channels, names = mapped[0], known[0]
        labels = known[1] or {c: [i] for i, c in enumerate(spec.class_names)}
        file_values = {raw: v for v, raw in mapped[1].items()} if known[1] else dict(spec.label_map)
    else:
        channels, names = spec.modalities, spec.modalities
        labels = {c: [i] for i, c in enumerate(spec.class_names)}
        file_values = dict(spec.label_map)
    return LayoutWriter(Path(out), layout, spec, tuple(channels), tuple(names), labels, file_values)

