"""Readers: recordings on disk -> csfm.data.record.Record with the lead contract applied."""
from csfm.data.readers.datasets import PTBXL, Code15, MimicIVECG, WfdbDirectory, read_labels
from csfm.data.readers.mimic3 import read_multisegment, stream_windows
from csfm.data.readers.wfdb_record import read_wfdb, record_files

__all__ = ["PTBXL", "Code15", "MimicIVECG", "WfdbDirectory", "read_labels", "read_multisegment", "read_wfdb",
           "record_files", "stream_windows"]
