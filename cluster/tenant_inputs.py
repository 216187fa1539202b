"""How a tenant's stored config and records become the method's inputs: records, requests, the training
recipe, the rendering, the device and dtype, the held-out split. The one place ``tenants`` models are
translated into ``eraser`` ones (the two layers never import each other)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from eraser.influence import SolveConfig
from eraser.records import Record as EraserRecord
from eraser.requests import EditRequest
from tenants.models import ErasureRequest, Record, TenantConfig

if TYPE_CHECKING:
    from cluster.jobs import ErasureJob


def to_eraser_records(records: Sequence[Record]) -> list[EraserRecord]:
    """The store's records (either form) as the method's."""
    return [EraserRecord(id=r.id, prompt=r.prompt, response=r.response, subject=r.subject) if r.messages is None
            else EraserRecord.from_messages(r.id, [(m.role, m.content) for m in r.messages], r.subject)
            for r in records]


def edit_requests(job: ErasureJob, train_ids: set[str]) -> tuple[list[EditRequest], dict[str, list[str]]]:
    """The method's requests (by explicit record ids, held-out ones included: the pipeline leaves them
    out of the update and of the reference population) and, per request id, the trained ids it edits."""
    result, trained = [], {}
    for body in job.requests:
        request = ErasureRequest.model_validate(body)
        ids = list(job.selections.get(request.request_id, ()))
        trained[request.request_id] = [i for i in ids if i in train_ids]
        if not ids:
            continue
        replacements = None
        if request.kind != "remove":  # validated: each replacement gives exactly the field its kind replaces
            replacements = {i: request.replacements[i].model_dump(exclude_none=True) for i in ids}
        result.append(EditRequest(kind=request.kind, records=tuple(ids), replacements=replacements,
                                  request_id=request.request_id))
    return result, trained


def train_config(config: TenantConfig):
    """The tenant's recipe as the method's TrainConfig."""
    from eraser.training import TrainConfig

    return TrainConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                       target_modules=tuple(config.lora.target_modules), epochs=config.training.epochs,
                       lr=config.training.lr, batch_size=config.training.batch_size, seed=config.training.seed)


def job_device(config: TenantConfig, worker_device: str | None = None) -> str:
    """Where a job of this tenant computes: the recipe's ``device`` resolved on this worker.

    ``worker_device`` is the GPU the runner gave the worker (``cuda:<local rank>`` for a Ray Train
    worker with ``use_gpu``), None for a CPU worker. ``auto``: that GPU, else a CUDA device this
    process sees, else the CPU; ``cuda``: that GPU, else ``cuda`` (refused by name where there is none);
    ``cpu``: the CPU, GPU or not."""
    wanted = config.training.device
    if wanted == "cpu":
        return "cpu"
    if worker_device is not None:
        return str(worker_device)
    if wanted == "cuda":
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tenant_solve(solve: SolveConfig, config: TenantConfig) -> SolveConfig:
    """``solve`` with the tenant's curvature budget, where its recipe sets one (curvature and erasure jobs
    both apply it, so a warmed curvature matches the erasure's settings)."""
    budget = config.training.curvature_budget_mib
    return solve if budget is None else replace(solve, cache_budget_mib=budget)


def job_dtype(config: TenantConfig):
    """The torch dtype of the tenant's base model in its jobs (the recipe's ``dtype``)."""
    from eraser.devices import parse_dtype

    return parse_dtype(config.training.dtype)


def record_format(config: TenantConfig):
    """The tenant's rendering (chat template, token limit) as the method's RecordFormat."""
    from eraser.rendering import RecordFormat

    return RecordFormat(chat_template=config.training.chat_template, max_length=config.training.max_length)


def split_records(config: TenantConfig, records: Sequence[Record]) -> tuple[list[EraserRecord], list[EraserRecord]]:
    """``(train, heldout)`` of a tenant's records as the method's: the records flagged ``heldout`` for a
    tenant whose reference was given (an import, ``heldout_unit`` "given"), else the onboarding split."""
    from eraser.reference import split_heldout

    if config.training.heldout_unit == "given":
        return (to_eraser_records([r for r in records if not r.heldout]),
                to_eraser_records([r for r in records if r.heldout]))
    return split_heldout(to_eraser_records(records), config.training.heldout_fraction, config.training.seed,
                         config.training.heldout_unit)


def retrain_recipe(config: TenantConfig):
    """The recipe the exact-retrain fallback trains with, or None when the tenant has none that would
    reproduce its adapter (``TenantConfig.retrain_unavailable`` says why): the pipeline then fails an
    erasure no other path makes pass instead of publishing a retrain of another recipe."""
    return None if config.retrain_unavailable() else train_config(config)


def with_retrain_note(checks: dict | None, config: TenantConfig) -> dict:
    """``checks`` saying, when it is so, that this tenant has no exact-retrain fallback (receipt, eraser.json)."""
    note = config.retrain_unavailable()
    return {**(checks or {}), "retrain_fallback": note} if note else dict(checks or {})
