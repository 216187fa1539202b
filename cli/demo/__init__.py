"""The main job: the whole product on embedded defaults, start to finish (``eraser demo``).

1. build the small base model (a ChatML chat template, pretrained on generic conversations), three
   tenants with synthetic customer-support records in the OpenAI chat fine-tuning form (a system
   message, the question, the answer) holding personal data (emails, account numbers, addresses)
   (:mod:`cli.demo.world`);
2. train each tenant's adapter through the cluster layer (a job on the Ray cluster) and start the
   service (:mod:`cli.demo.service`);
3. show through the OpenAI-compatible API that tenant A's model reveals one customer's data;
4. submit an erasure for that customer over HTTP and follow its receipt to ``published`` while a
   client keeps querying every tenant (:mod:`cli.demo.clients`);
5. show the data is no longer revealed and the other tenants are unchanged (3 to 5: :mod:`cli.demo.erasure`);
6. compare with an adapter retrained without that customer (:mod:`cli.demo.compare`), then print a
   summary table and where everything lives (:mod:`cli.demo.summary`).

Every step is a check in the report (:mod:`cli.demo.report`), ``<workdir>/demo-report.json``;
:mod:`cli.demo.run` holds them together. Everything it starts (SeaweedFS, Ray, Serve) is stopped on
the way out, also on Ctrl-C.
"""

from cli.demo.clients import Load, ask, follow_receipt, logged_purge, secret_of, wait_ready
from cli.demo.compare import answers_kept, answers_side_by_side
from cli.demo.config import APP_NAME, BASE_MODEL_NAME, DemoConfig
from cli.demo.report import DemoReport, Step, say, stage
from cli.demo.run import run_demo
from cli.demo.summary import erasure_breakdown, print_summary
from cli.demo.world import build_base, tenant_records

__all__ = [
    "APP_NAME", "BASE_MODEL_NAME", "DemoConfig", "DemoReport", "Load", "Step", "answers_kept", "answers_side_by_side",
    "ask", "build_base", "erasure_breakdown", "follow_receipt", "logged_purge", "print_summary", "run_demo", "say",
    "secret_of", "stage", "tenant_records", "wait_ready",
]
