"""Readers: recordings on disk -> csfm.record.Record with the lead contract applied."""
from csfm.readers.datasets import PTBXL, Code15, MimicIVECG, WfdbDirectory
from csfm.readers.mimic3 import read_multisegment, stream_windows
from csfm.readers.wfdb_record import read_wfdb, record_files

__all__ = ["PTBXL", "Code15", "MimicIVECG", "WfdbDirectory", "read_multisegment", "read_wfdb", "record_files",
           "stream_windows"]
