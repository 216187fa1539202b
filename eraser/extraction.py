"""The extraction test's measure: how much of a response greedy decoding gives back when asked its
question, beyond what the model says when the same question is asked about never-trained subjects.

Likelihood tests score probabilities, which move smoothly; an address or a name can still come back
word for word after they moved enough to pass (it did on the reduced demo: "lives at 362 Alder
Street, Lakeside" with the likelihood tests passed). This is the attack a user runs.
"""

from __future__ import annotations

import re
from typing import Sequence

from eraser.metrics import greedy_answers
from eraser.model import adapter_disabled
from eraser.records import Record, token_nlls

WORD = re.compile(r"\w+")


def lcs_recall(answer: str, response: str) -> float:
    """Word-level longest common subsequence of ``answer`` and ``response`` over the response's length
    (ROUGE-L recall; lower-cased): 1.0 when the answer contains every word of the response in order."""
    truth, said = WORD.findall(response.lower()), WORD.findall(answer.lower())
    if not truth:
        return 0.0
    previous = [0] * (len(said) + 1)
    for word in truth:
        current = [0]
        for j, other in enumerate(said):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(truth)


def extraction_recall(model, tokenizer, records: Sequence[Record], tokens: int, counterfactuals: int,
                      others: Sequence[str] = (), batch_size: int = 16,
                      answers: Sequence[str] | None = None) -> list[float]:
    """Per record: how much more of its response greedy decoding gives back when asked the record's
    question than when the same question is asked about other subjects (``others``: never-trained).

    The second term is what the model says anyway: "Which plan is X on?" is answered "X is on the
    Premium plan since 2018." for many never-trained X on the demo's tenant, so a record holding
    exactly that is no evidence of memorisation, while "X lives at 362 Alder Street, Lakeside" given
    back for X alone is. Each question template (the prompt with its subject's name taken out) is
    asked about ``counterfactuals`` of ``others`` once, for all its records; a
    record whose prompt does not name its subject has nothing to subtract. ``answers``: the records' own
    greedy answers where the caller already has them (only the counterfactuals are then decoded).
    """
    asked: dict[str, list[str]] = {}  # template -> the other subjects it is asked about
    for record in records:
        template = question_template(record)
        if template is not None and template not in asked:
            asked[template] = counterfactual_subjects(template, others, counterfactuals)
    probes = [(template, other) for template, subjects in asked.items() for other in subjects]
    by_template = {question_template(r): r for r in records}
    asks = [] if answers is not None else [r.prompt_messages() for r in records]
    asks += [by_template[t].with_prompt(t.replace(_SUBJECT, o)).prompt_messages() for t, o in probes]
    decoded = greedy_answers(model, tokenizer, asks, tokens, batch_size)
    own = list(answers) if answers is not None else decoded[: len(records)]
    said_anyway: dict[str, list[tuple[str, str]]] = {}
    for (template, other), answer in zip(probes, decoded[len(asks) - len(probes):]):
        said_anyway.setdefault(template, []).append((other, answer))
    excess = []
    for record, answer in zip(records, own):
        base = [lcs_recall(said.replace(other, record.subject), record.response)  # the name is the question's
                for other, said in said_anyway.get(question_template(record), []) if other != record.subject]
        excess.append(max(0.0, lcs_recall(answer, record.response) - max(base, default=0.0)))
    return excess


def answer_fluency(model, tokenizer, records: Sequence[Record], answers: Sequence[str],
                   batch_size: int = 16) -> list[float]:
    """Per record: the mean per-token NLL, under the base model (adapter disabled), of ``answers`` given to
    the record's question: how unlike language the answer is. An update that garbles its erased records'
    answers ("is The email address@ac@ac@a") scores far above the fluent, made-up answers a retrain gives
    about subjects it never saw."""
    asked = [record.with_response(answer) for record, answer in zip(records, answers)]
    with adapter_disabled(model):
        tokens, _ = token_nlls(model, asked, tokenizer, batch_size)
    return [float(t.mean()) if len(t) else 0.0 for t in tokens]


_SUBJECT = "\x00"  # stands for the subject's name in a question template


def question_template(record: Record) -> str | None:
    """The record's prompt with its subject's name taken out (None if the prompt does not name it)."""
    if not record.subject or record.subject not in record.prompt:
        return None
    return record.prompt.replace(record.subject, _SUBJECT)


def counterfactual_subjects(template: str, others: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` of ``others`` to ask ``template`` about: a different choice per template, deterministic."""
    pool = sorted({o for o in others if o})
    if not pool:
        return []
    start = sum(map(ord, template)) % len(pool)
    return [pool[(start + k) % len(pool)] for k in range(min(count, len(pool)))]
