"""Training data: loaders for the usual image-caption formats, splits, datasets and synthetic shapes.

Every map-style source loads into a RecordSet (one Record per image, all its captions):
image folders (root/<class>/*.jpg, captions from templates), CSV tables (Flickr8k
captions.txt), Flickr30k results.csv, JSON lists, LLaVA-Pretrain, COCO captions, Parquet
(Hugging Face style) and the synthetic shapes set. CaptionDataset decodes records for a
DataLoader; ShardDataset streams webdataset-style tar shards; collate drops unreadable
images while counting them against the run's bad-image budget (check_bad_fraction).

    spec = parse_data_spec("csv:/data/flickr8k/captions.txt")   # or just the path
    train, val = split_records(load_records(spec), val_fraction=0.1)
"""

from .dataset import CaptionDataset, collate
from .errors import DataError, check_bad_fraction
from .load import load_records
from .records import Record, RecordSet
from .shapes import generate_shapes, held_out_names, shapes_eval_set
from .shard_writer import ShardWriteResult, write_shards
from .shards import ShardDataset, count_shard_samples, expand_braces
from .spec import DataSpec, detect_kind, parse_data_spec
from .split import split_records

__all__ = [
    "CaptionDataset",
    "DataError",
    "DataSpec",
    "Record",
    "RecordSet",
    "ShardDataset",
    "ShardWriteResult",
    "check_bad_fraction",
    "collate",
    "count_shard_samples",
    "detect_kind",
    "expand_braces",
    "generate_shapes",
    "held_out_names",
    "load_records",
    "parse_data_spec",
    "shapes_eval_set",
    "split_records",
    "write_shards",
]
