"""serve: the online service. Ray Serve + vLLM with per-tenant LoRA adapters, OpenAI-compatible
routes, erasure routes, and live adapter reload with nothing stale (see docs/architecture.md#the-erasure-flow).

``serve run serve.app:build_app`` builds the application; the cluster layer reaches it through
:class:`SwitchNotifier` (a publish hook) and the ingress reaches the cluster through an
:class:`ErasureBackend`.
"""

from serve.adapters import AdapterRegistry, AdapterSource, StoreAdapterSource, SwitchEvent
from serve.backend import BackendContext, ClusterBackend, ErasureBackend, PendingOnlyBackend
from serve.board import AdapterBoard, SwitchNotifier
from serve.config import AutoscalingConfig, EngineConfig, ServeConfig
from serve.engine import AdapterRef, Completion, Engine, GenerationChunk, SamplingOptions, VLLMEngine
from serve.errors import AdapterLoadError, EngineError, EngineInputError, NoAdapterError, ServeConfigError, ServeError

__all__ = [
    "AdapterBoard",
    "AdapterLoadError",
    "AdapterRef",
    "AdapterRegistry",
    "AdapterSource",
    "AutoscalingConfig",
    "BackendContext",
    "ClusterBackend",
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineInputError",
    "ErasureBackend",
    "GenerationChunk",
    "NoAdapterError",
    "PendingOnlyBackend",
    "SamplingOptions",
    "ServeConfig",
    "ServeConfigError",
    "ServeError",
    "StoreAdapterSource",
    "SwitchEvent",
    "SwitchNotifier",
    "VLLMEngine",
]
