"""hf_taskarith: model merging by task arithmetic for the Hugging Face ecosystem.

    from hf_taskarith import TaskVector
    base = "org/base-model"
    tv_med = TaskVector.from_models(base, "org/med-finetune")
    tv_code = TaskVector.from_adapter("org/code-lora")
    merged = (0.4 * (tv_med + tv_code)).apply_to(base)
    merged.save_pretrained("merged-model", dtype="bfloat16")
"""

from .checkpoint import SafetensorsCheckpoint, StateDictStore, TensorStore, open_checkpoint
from .engine import StreamingMerge
from .errors import (
    CheckpointError,
    IncompatibleTensorsError,
    ModelReferenceError,
    OutputExistsError,
    RecipeError,
    TaskArithError,
    UnsupportedAdapterError,
)
from .lora import LoraAdapter
from .merged import MergedModel
from .refs import ResolvedModel, resolve
from .task_vector import BaseModel, DenseTaskVector, LoraTaskVector, TaskVector
from .stored import StoredTaskVector
from .gradient import DatasetError, compute_gradient_task_vector
from .geometry import GeometryReport, PairwiseStats, analyze_task_vectors
from .trajectory import TrajectoryReport, analyze_trajectory, find_checkpoints

__version__ = "0.1.0"

__all__ = [
    "BaseModel",
    "DatasetError",
    "GeometryReport",
    "PairwiseStats",
    "StoredTaskVector",
    "TrajectoryReport",
    "analyze_task_vectors",
    "analyze_trajectory",
    "compute_gradient_task_vector",
    "find_checkpoints",
    "CheckpointError",
    "DenseTaskVector",
    "IncompatibleTensorsError",
    "LoraAdapter",
    "LoraTaskVector",
    "MergedModel",
    "ModelReferenceError",
    "OutputExistsError",
    "RecipeError",
    "ResolvedModel",
    "SafetensorsCheckpoint",
    "StateDictStore",
    "StreamingMerge",
    "TaskArithError",
    "TaskVector",
    "TensorStore",
    "UnsupportedAdapterError",
    "open_checkpoint",
    "resolve",
]
