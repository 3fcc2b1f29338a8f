"""Write small real DICOM files with pydicom for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                slope: float | None = None, intercept: float | None = None, center: float | None = None,
                width: float | None = None, frames: int | None = None, rows: int | None = None,
                columns: int | None = None, pixel_data: bytes | None = None, preamble: bool = True,
                with_pixels: bool = True, transfer_syntax: str | None = None) -> Path:
    """A CT-like DICOM file of ``pixels`` (``(R, C)``, ``(F, R, C)`` or ``(R, C, 3)``); the keyword arguments
    override what the header says, so a test can make it lie."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(pixels)
    colour = photometric in ("RGB", "YBR_FULL")
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    shape = arr.shape[:2] if colour else arr.shape[-2:]
    ds.Rows, ds.Columns = rows or shape[0], columns or shape[1]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    if frames is not None or arr.ndim == 3 and not colour:
        ds.NumberOfFrames = frames if frames is not None else arr.shape[0]
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0, "HU"
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if with_pixels:
        ds.PixelData = pixel_data if pixel_data is not None else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return Path(path)


def ct_slice(size: int = 32) -> np.ndarray:
    """Unsigned stored values of a CT slice (HU + 1024 with slope 1, intercept -1024): air, soft tissue and bone."""
    hu = np.full((size, size), -1000, np.int16)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu[r < size * 0.45] = 40
    hu[r < size * 0.15] = 900
    hu[:, : size // 4] += (np.arange(size)[:, None] * 7).astype(np.int16)  # a ramp, so windows differ
    return (hu + 1024).astype(np.uint16)
