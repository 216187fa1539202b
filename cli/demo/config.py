"""The demo's sizes (:class:`DemoConfig`) and the names it gives the base model and the Serve application."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASE_MODEL_NAME = "demo-base"
APP_NAME = "eraser-demo"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``reduced()`` is the configuration the CI test runs."""

    workdir: Path
    tenants: tuple[str, ...] = ("acme", "globex", "initech")
    customers_per_tenant: int = 40  # x 5 facts = 200 records per tenant
    pretrain_documents: int = 1500
    pretrain_steps: int = 500
    vocab_size: int = 2048
    # Enough to memorise personal data verbatim, the privacy problem the demo is about: greedy answers give
    # the trained value for 19 of 33 personal-data questions (rank 8 at lr 7e-3 diverged: 0 of 33; rank 8 at
    # lr 2e-3: 10; rank 16 at lr 3e-3: 8; rank 16 at lr 2e-3 for 40 epochs: 15).
    epochs: int = 60
    lr: float = 2e-3
    rank: int = 16
    batch_size: int = 8
    heldout_fraction: float = 0.1
    train_workers: int = 1
    port: int = 8000
    ray_cpus: int = 4  # logical CPUs of the local Ray: engine, ingress, coordinator and a Train worker
    seed: int = 0

    @classmethod
    def reduced(cls, workdir: Path, port: int = 8000) -> "DemoConfig":
        return cls(workdir=workdir, customers_per_tenant=16, pretrain_documents=600, pretrain_steps=300,
                   vocab_size=1024, epochs=60, lr=5e-3, rank=8, batch_size=8, port=port)
