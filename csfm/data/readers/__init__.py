"""Readers: recordings on disk -> csfm.data.record.Record with the lead contract applied."""
from csfm.data.readers.datasets import PTBXL, Code15, MimicIVECG, WfdbDirectory, read_labels, read_wfdb_record
from csfm.data.readers.dicom_ecg import read_dicom_ecg
from csfm.data.readers.edf import read_edf
from csfm.data.readers.files import FileFolder, detect_format, read_record
from csfm.data.readers.ge_muse import read_ge_muse
from csfm.data.readers.hl7_aecg import read_hl7_aecg
from csfm.data.readers.philips import read_philips
from csfm.data.readers.safe_io import FileFormatError
from csfm.data.readers.scp_ecg import read_scp_ecg
from csfm.data.readers.mimic3 import read_multisegment, stream_windows
from csfm.data.readers.wfdb_record import read_wfdb, record_files

__all__ = ["PTBXL", "Code15", "FileFolder", "FileFormatError", "MimicIVECG", "WfdbDirectory", "detect_format",
           "read_dicom_ecg", "read_edf", "read_ge_muse", "read_hl7_aecg", "read_labels", "read_multisegment",
           "read_philips", "read_record", "read_scp_ecg", "read_wfdb", "read_wfdb_record", "record_files",
           "stream_windows"]
