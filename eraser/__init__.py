"""eraser: the LLMEraser method on PEFT LoRA adapters (pure math: torch, transformers, peft)."""

from eraser.errors import (
    AdapterMismatchError,
    EmptySelectionError,
    EraserError,
    InvalidRecordsError,
    InvalidRequestError,
    SolverDivergedError,
    SolverNotConvergedError,
    StaleCurvatureError,
    UnknownRecordError,
    VerificationFailedError,
    VerificationUnavailableError,
)
from eraser.influence import InfluenceSystem, Shard, SolveConfig
from eraser.pipeline import ErasureOutcome, PipelineConfig, verified_erase
from eraser.records import Record, load_records, record_losses, save_records
from eraser.requests import Edit, EditRequest, apply_edits, build_edits, merge_edits
from eraser.solvers import LowRankCurvature, SolverReport
from eraser.remediate import RemediationConfig
from eraser.training import TrainConfig, add_lora, train_lora
from eraser.reference import split_heldout
from eraser.verify import VerifyConfig, VerifyResult, verify

__all__ = [
    "ErasureOutcome",
    "PipelineConfig",
    "RemediationConfig",
    "VerificationFailedError",
    "VerificationUnavailableError",
    "VerifyConfig",
    "VerifyResult",
    "split_heldout",
    "verified_erase",
    "verify",
    "AdapterMismatchError",
    "Edit",
    "EditRequest",
    "EmptySelectionError",
    "EraserError",
    "InfluenceSystem",
    "InvalidRecordsError",
    "InvalidRequestError",
    "LowRankCurvature",
    "Record",
    "Shard",
    "SolveConfig",
    "SolverDivergedError",
    "SolverNotConvergedError",
    "SolverReport",
    "StaleCurvatureError",
    "TrainConfig",
    "UnknownRecordError",
    "add_lora",
    "apply_edits",
    "build_edits",
    "load_records",
    "merge_edits",
    "record_losses",
    "save_records",
    "train_lora",
]
