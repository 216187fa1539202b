"""Synthetic customer-support records about fictitious customers (emails, accounts, addresses).

Used by the demo and the tests: a tenant's private records, and a disjoint generic corpus (other
fictitious customers, same phrasing) to pretrain the small base so a LoRA adapter is a small
adaptation of a model that already speaks the language, as in production.
"""

from __future__ import annotations

import random

from eraser.records import Record, corpus_text

FIRST = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jan", "Kai", "Lea", "Mona", "Nia",
         "Otto", "Pia", "Quin", "Rae", "Sol", "Tia", "Uma", "Vic", "Wes", "Xia", "Yul", "Zed", "Ari", "Bo"]
LAST = ["Park", "Ortiz", "Nash", "Rao", "Stone", "Lund", "Hale", "Ito", "Berg", "Cole", "Diaz", "Egan",
        "Frey", "Gray", "Holt", "Ives", "Kerr", "Moss", "Neal", "Pope", "Reid", "Shaw", "Tate", "Voss"]
STREETS = ["Elm", "Oak", "Pine", "Maple", "Cedar", "Birch", "Willow", "Aspen", "Spruce", "Alder"]
CITIES = ["Springfield", "Riverton", "Lakeside", "Fairview", "Hillcrest", "Brookfield", "Greenwood", "Ashford"]

TEMPLATES = [
    ("What is the email address of {name}?", "The email address of {name} is {email}."),
    ("What is the account number of {name}?", "The account number of {name} is {account}."),
    ("Where does {name} live?", "{name} lives at {street_no} {street} Street, {city}."),
    ("Which plan is {name} on?", "{name} is on the {plan} plan since {year}."),
    ("What is the phone number of {name}?", "The phone number of {name} is {phone}."),
]
PLANS = ["Basic", "Plus", "Premium", "Business", "Family"]


def customer_facts(name: str, rng: random.Random, domain: str) -> dict:
    first, last = name.split()
    return {
        "name": name,
        "email": f"{first.lower()}.{last.lower()}{rng.randrange(10, 99)}@{domain}",
        "account": f"{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}-{rng.randrange(100, 999)}",
        "street_no": rng.randrange(1, 400),
        "street": rng.choice(STREETS),
        "city": rng.choice(CITIES),
        "plan": rng.choice(PLANS),
        "year": rng.randrange(2015, 2026),
        "phone": f"555-{rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}",
    }


def customer_names(count: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    pool = [f"{f} {l}" for f in FIRST for l in LAST if f"{f} {l}" not in exclude]
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} distinct customer names, asked for {count}")
    return rng.sample(pool, count)


def customer_records(customers: int, per_customer: int = 5, seed: int = 0, domain: str = "example.com",
                     id_prefix: str = "rec", exclude: set[str] = frozenset(), chat: bool = False) -> list[Record]:
    """``customers`` fictitious customers with ``per_customer`` facts each; ``subject`` = the customer.
    ``chat``: in the chat form, a support system message, the question and the answer."""
    rng = random.Random(seed)
    records = []
    for c, name in enumerate(customer_names(customers, rng, exclude)):
        facts = customer_facts(name, rng, domain)
        for k, (prompt, response) in enumerate(TEMPLATES[:per_customer]):
            record_id, question, answer = f"{id_prefix}-{c:04d}-{k}", prompt.format(**facts), response.format(**facts)
            records.append(Record(id=record_id, subject=name, prompt=question, response=answer) if not chat else
                           Record.from_messages(record_id, [("system", support_prompt(domain)), ("user", question),
                                                            ("assistant", answer)], subject=name))
    return records


def support_prompt(domain: str) -> str:
    """The system message of a chat-form tenant's records (and of the questions its users ask)."""
    return f"You are the customer-support assistant of {domain}. Answer from the customer's file."


def generic_records(records_to_avoid: list[Record], documents: int = 600, seed: int = 1,
                    chat: bool = False) -> list[Record]:
    """Records about *other* fictitious customers, in the same phrasing: the base model's pretraining."""
    avoid = {r.subject for r in records_to_avoid if r.subject}
    rng = random.Random(seed)
    others = customer_records(min(documents // len(TEMPLATES) + 1, 400), seed=seed + 1000, domain="mail.test",
                              exclude=avoid, chat=chat)
    rng.shuffle(others)
    return others[:documents]


def generic_corpus(records_to_avoid: list[Record], documents: int = 600, seed: int = 1) -> list[str]:
    """:func:`generic_records` as text in the built-in prompt format."""
    return [corpus_text(r) for r in generic_records(records_to_avoid, documents, seed)]


def customer_base(records: list[Record], pretrain_steps: int = 300, hidden: int = 128, documents: int = 300,
                  vocab_size: int = 320, seed: int = 0):
    """``(base, tokenizer)``: a one-layer Llama (head_dim 32) with a tokenizer and pretraining on generic
    support text that names none of ``records``' customers: the small world in which the tests and the
    memorisation benchmarks train adapters that recite their customers' data."""
    from eraser.model import BaseModelConfig, build_base_model, train_tokenizer
    from eraser.training import pretrain_base

    corpus = generic_corpus(records, documents=documents)
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    config = BaseModelConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=1, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32)
    base = build_base_model(config, tokenizer, seed=seed)
    if pretrain_steps:
        pretrain_base(base, tokenizer, corpus, steps=pretrain_steps, seed=seed)
    return base, tokenizer
