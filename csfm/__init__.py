"""csfm: cardiac sensing foundation model for ECG and PPG (model, data, training, embeddings)."""
from csfm.model.batch import Batch, make_batch
from csfm.model.checkpoint import load_pretrained, save_checkpoint
from csfm.model.config import PRESETS, ModelConfig, preset
from csfm.data.demo import DemoDataset, make_demo_record
from csfm.data.leads import resolve_channels
from csfm.model.encoder import CSFMEncoder
from csfm.data.preprocess import PreprocessConfig, preprocess_record
from csfm.model.pretrain import MaskedPretrainer
from csfm.data.readers import PTBXL, Code15, MimicIVECG, WfdbDirectory, read_multisegment, read_wfdb, stream_windows
from csfm.data.record import Record
from csfm.data.tokenizer import ReportTokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "PTBXL", "Batch", "CSFMEncoder", "Code15", "DemoDataset",
    "MaskedPretrainer", "MimicIVECG", "ModelConfig", "PreprocessConfig", "Record", "ReportTokenizer",
    "WfdbDirectory", "load_pretrained", "make_batch", "make_demo_record", "preset",
    "preprocess_record", "read_multisegment", "read_wfdb", "resolve_channels", "save_checkpoint", "stream_windows",
]
