"""The demo's first two steps are checks, not stages: what they find wrong in the store and the API
(`cli.demo.world.check_world`, `cli.demo.service.check_service`), on fakes; the real run is test_demo."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from cli.demo.config import BASE_MODEL_NAME, DemoConfig
from cli.demo.service import Service, check_service
from cli.demo.world import World, check_world

CONFIG = DemoConfig(workdir=Path("unused"), tenants=("acme", "globex"), customers_per_tenant=2)  # 10 records each


class FakeStore:
    def __init__(self, records: dict[str, int], models=(BASE_MODEL_NAME,), heads=None, adapters=None):
        self.records, self.models = records, list(models)
        self.heads, self.adapters = heads or {}, adapters or {}

    def list_models(self):
        return self.models

    def tenant_exists(self, name):
        return name in self.records

    def list_data_versions(self, tenant):
        return ["d000001"]

    def get_data_manifest(self, tenant, version):
        return SimpleNamespace(records=self.records[tenant])

    def verify_key(self, tenant, key):
        return key == f"key-{tenant}"

    def get_head(self, tenant):
        adapter = self.heads.get(tenant)
        return (SimpleNamespace(adapter=adapter) if adapter else None), None

    def list_adapter_versions(self, tenant):
        return self.adapters.get(tenant, [])


def world(keys=None) -> World:
    return World(Path("base"), keys or {t: f"key-{t}" for t in CONFIG.tenants},
                 {t: [object()] * 10 for t in CONFIG.tenants})


def test_step_one_passes_when_the_store_holds_the_base_and_every_tenant_with_its_records():
    stored, problems = check_world(CONFIG, FakeStore({"acme": 10, "globex": 10}), world())
    assert stored == {"acme": 10, "globex": 10} and problems == []


def test_step_one_names_a_missing_base_tenant_short_dataset_and_bad_key():
    store = FakeStore({"acme": 9}, models=())
    _, problems = check_world(CONFIG, store, world({"acme": "wrong", "globex": "key-globex"}))
    assert problems == [f"no base model {BASE_MODEL_NAME!r} in the store",
                        "tenant acme: 9 records stored, 10 generated, 10 expected",
                        "tenant acme: its API key does not verify",
                        "tenant globex: not in the store"]


def clients(listed: dict[str, list[str]]) -> dict:
    def lister(ids):
        return SimpleNamespace(models=SimpleNamespace(list=lambda: SimpleNamespace(data=[SimpleNamespace(id=i) for i in ids])))
    return {tenant: lister(ids) for tenant, ids in listed.items()}


def test_step_two_passes_when_heads_point_at_the_trained_adapters_and_the_api_lists_each_tenant():
    store = FakeStore({}, heads={"acme": "v000001", "globex": "v000001"},
                      adapters={"acme": ["v000001"], "globex": ["v000001"]})
    service = Service("http://x", clients({"acme": ["acme"], "globex": ["globex"]}))
    assert check_service(store, service, {"acme": "v000001", "globex": "v000001"}) == []


def test_step_two_names_a_wrong_head_a_missing_adapter_and_an_unlisted_model():
    store = FakeStore({}, heads={"globex": "v000001"}, adapters={"globex": []})
    service = Service("http://x", clients({"acme": ["acme"], "globex": []}))
    assert check_service(store, service, {"acme": "v000001", "globex": "v000001"}) == [
        "tenant acme: HEAD is None, onboarding published v000001",
        "tenant globex: HEAD's adapter v000001 is not in the store",
        "tenant globex: /v1/models lists []",
    ]


def test_the_summary_splits_request_to_live_into_the_method_and_the_service_around_it():
    from cli.demo.summary import erasure_breakdown

    stages = {"influence_s": 2.0, "verify_s": 0.5, "load_s": 3.0, "load_imports_s": 2.0, "load_base_model_s": 0.6,
              "publish_s": 0.2, "notify_s": 0.1}
    (_, method), (_, service) = erasure_breakdown(stages, request_to_live_s=6.0)
    assert method == "2.5 s (influence 2.0, verification 0.5)"
    assert service.startswith("3.5 s (model load 3.0: imports 2.0, base 0.6; publish 0.2, switch 0.1")
    assert erasure_breakdown({}, 6.0) == []
