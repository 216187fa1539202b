"""The tenant store: tenants, datasets, adapter versions, HEAD, the erasure ledger, purge, API keys.

Write protocol (why a half-written version is never visible):
- a new data/adapter version number is *claimed* first with a conditional create of
  ``<version>/_claim.json`` (``IfNoneMatch="*"``), so two writers never share a number. The claim
  stays for good (purge keeps it too): a number, once taken, is never reused, so a version name
  always means the same bytes to every cache (vLLM keys LoRA caches by name);
- the files are uploaded, then the commit marker is written LAST, also conditionally:
  ``dataset.json`` for data, ``eraser.json`` for adapters, ``eraser-model.json`` for models;
- only versions with a commit marker are listed, downloaded or accepted by ``move_head``.
  Uploads that never commit are cleaned up on failure, or by purge once older than
  ``orphan_seconds``.
- HEAD.json moves only by compare-and-swap (``IfNoneMatch="*"`` to create, ``IfMatch`` the ETag
  read), and every HEAD.json carries its time so two HEADs never share an ETag.

One module per resource, each a part of :class:`TenantStore`: ``tenants``, ``datasets``, ``adapters``
(and HEAD), ``base_models``, ``ledger`` (receipts), ``purge``, ``completion`` (what a complete erasure is
checked against), ``keys``; ``base`` holds what they share, ``imports`` what an import accepts.
"""

from tenants.store.adapters import AdaptersMixin
from tenants.store.base import ADAPTER_WEIGHTS, CLAIM_FILE, ORPHAN_SECONDS, StoreBase
from tenants.store.base_models import BaseModelsMixin
from tenants.store.completion import CompletionMixin
from tenants.store.datasets import DatasetsMixin
from tenants.store.imports import ImportCheck, adapter_files, imported_config, lora_from_peft_config
from tenants.store.keys import KeysMixin
from tenants.store.ledger import LedgerMixin
from tenants.store.purge import PurgeMixin
from tenants.store.tenants import TenantsMixin


class TenantStore(TenantsMixin, DatasetsMixin, AdaptersMixin, BaseModelsMixin, LedgerMixin, PurgeMixin,
                  CompletionMixin, KeysMixin, StoreBase):
    """All persistent state of the service, in one S3 bucket under one prefix (docs/architecture.md#s3-layout).
    
    ``client`` may be any object with boto3's S3 client methods (tests wrap one to inject faults).
    Thread-safe: boto3 clients are, and the local caches are guarded by per-entry locks.
    """


__all__ = ["ADAPTER_WEIGHTS", "CLAIM_FILE", "ORPHAN_SECONDS", "ImportCheck", "TenantStore", "adapter_files",
           "imported_config", "lora_from_peft_config"]
