"""csfm: cardiac sensing foundation model for ECG and PPG (model, data, training, embeddings)."""
from csfm.model.batch import Batch, make_batch
from csfm.model.checkpoint import load_pretrained, save_checkpoint
from csfm.model.config import PRESETS, ModelConfig, preset
from csfm.data.demo import DemoDataset, make_demo_record
from csfm.data.leads import resolve_channels
from csfm.model.encoder import CSFMEncoder
from csfm.data.preprocess import PreprocessConfig, preprocess_record
from csfm.model.pretrain import MaskedPretrainer
from csfm.data.readers import (PTBXL, Code15, FileFolder, MimicIVECG, WfdbDirectory, read_multisegment, read_record,
                               read_wfdb, stream_windows)
from csfm.data.record import Record
from csfm.data.tokenizer import ReportTokenizer
from csfm.evaluation.arrays import embed_array, embed_arrays, record_from_array
from csfm.evaluation.embedding import load_encoder
from csfm.evaluation.finetuned import load_model_dir
from csfm.evaluation.predict import predict_source

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "PTBXL", "Batch", "CSFMEncoder", "Code15", "DemoDataset", "FileFolder",
    "MaskedPretrainer", "MimicIVECG", "ModelConfig", "PreprocessConfig", "Record", "ReportTokenizer",
    "WfdbDirectory", "embed_array", "embed_arrays", "load_encoder", "load_model_dir", "load_pretrained",
    "make_batch", "make_demo_record", "predict_source", "preset", "preprocess_record", "read_multisegment",
    "read_record", "read_wfdb", "record_from_array", "resolve_channels", "save_checkpoint", "stream_windows",
]
