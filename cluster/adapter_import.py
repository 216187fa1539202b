"""Importing an adapter trained elsewhere: the method's checks before it becomes a tenant's, in this
process (:func:`check_import`) or on a Ray worker (:func:`check_import_in_task`, whose answer
:func:`import_evidence` reads back on the caller's side).

The one place where the method's refusals of an import become the store's errors: whatever ``eraser``
refuses (an ``EraserError``, or the adapter's files failing to load) is raised as the ``tenants.errors``
class naming the input at fault (InvalidConfigError for the base model, InvalidAdapterError for the
adapter, InvalidRecordsError naming the record), so every layer above reports it as it reports the
store's own; across a Ray task those classes travel by name (:data:`IMPORT_ERRORS`). The two layers
keep their own error classes because they never import each other (docs/architecture.md#layers).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from eraser.curvature import lora_parameters
from eraser.errors import EraserError
from tenants.errors import InvalidAdapterError, InvalidConfigError, InvalidRecordsError, TenantError, VersionNotFoundError
from tenants.models import Record, TenantConfig
from tenants.settings import StoreSettings
from tenants.store import TenantStore

from cluster.errors import ClusterError
from cluster.tenant_inputs import record_format, to_eraser_records


def check_import(store_settings: StoreSettings, config: TenantConfig, adapter_dir: Path,
                 records: Sequence[Record]) -> dict:
    """What must hold before an adapter trained elsewhere becomes a tenant's, that only the method can
    tell: the base loads and runs under the method's attention, the adapter loads on it as every erasure
    job will load it (modules and shapes fit; ``load_adapter`` refuses PEFT features the method does not
    handle), and the tenant's rendering encodes every record (a chat template that cannot would fail
    each erasure later instead). One forward pass, on the first record, proves the base runs.

    Raises the store's errors, so every layer can report them: InvalidConfigError for the base model,
    InvalidAdapterError for the adapter, InvalidRecordsError naming the record. Returns the evidence for
    the adapter's ``eraser.json``.
    """
    from eraser.model import load_adapter, load_base, load_tokenizer
    from eraser.records import encode, per_record_losses

    base_dir = TenantStore(store_settings).resolve_base_model(config.base_model)
    try:
        tokenizer = load_tokenizer(base_dir, record_format(config))
        base = load_base(base_dir)
    except (EraserError, OSError, ValueError) as error:
        raise InvalidConfigError(f"base model {config.base_model!r}: {error}") from None
    try:
        model = load_adapter(base, adapter_dir)
    except Exception as error:  # the adapter is the input here: whatever fails to load it is its fault
        # (EraserError; or the weights file itself, e.g. safetensors' SafetensorError for a corrupt header)
        detail = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())  # PEFT: a line a tensor
        kind = "" if isinstance(error, EraserError) else f"{type(error).__name__}: "
        raise InvalidAdapterError(f"adapter for base model {config.base_model!r}: {kind}{detail}") from None
    converted = to_eraser_records(records)
    for record, mine in zip(records, converted):
        try:
            encode(mine, tokenizer)
        except EraserError as error:
            raise InvalidRecordsError(f"record {record.id!r}: {error}") from None
    try:
        loss = float(per_record_losses(model, converted[:1], tokenizer)[0])
    except EraserError as error:
        raise InvalidConfigError(f"base model {config.base_model!r}: {error}") from None
    parameters = lora_parameters(model)
    return {"adapter_loads": True, "lora_tensors": len(parameters),
            "lora_parameters": int(sum(p.numel() for p in parameters)), "records_encoded": len(records),
            "first_record_loss": loss}


# The store's errors check_import raises, by name, so a Ray task can return them instead of raising across Ray.
IMPORT_ERRORS: dict[str, type[Exception]] = {
    error.__name__: error for error in (InvalidAdapterError, InvalidConfigError, InvalidRecordsError,
                                        VersionNotFoundError, TenantError)}


def check_import_in_task(store_settings: StoreSettings, config: dict, files: dict[str, bytes],
                         records: list[dict]) -> dict:
    """:func:`check_import` on a Ray worker: the adapter written to a temporary directory, the
    result or the store's error returned as data (read back by :func:`import_evidence`)."""
    workdir = Path(tempfile.mkdtemp(prefix="eraser-import-"))
    try:
        for name, body in files.items():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_bytes(body)
        evidence = check_import(store_settings, TenantConfig.model_validate(config), workdir,
                                [Record.model_validate(r) for r in records])
        return {"evidence": evidence, "error_type": None}
    except TenantError as error:
        return {"error_type": type(error).__name__ if type(error).__name__ in IMPORT_ERRORS else "TenantError",
                "error": str(error)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def import_evidence(body: dict) -> dict:
    """The evidence :func:`check_import_in_task` returned, or the store's error it carried, raised again."""
    if body.get("error_type") is not None:
        raise IMPORT_ERRORS.get(body["error_type"], ClusterError)(body["error"])
    return body["evidence"]
