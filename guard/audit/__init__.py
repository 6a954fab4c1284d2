"""The audit log: one record per request guard answered (or failed), kept in a store operators query.

`record` defines what a record holds, `feedback` what users say about an answer (stored beside its record),
`store` what any store does, `sqlite` the store guard ships, `report` what `guard audit` prints and plots.
"""

from guard.audit.feedback import Feedback, FoundRecord
from guard.audit.record import (
    AuditRecord,
    CandidateRecord,
    ChoiceRecord,
    Finished,
    RefusalRecord,
    StepDecision,
    input_to_keep,
    record_of,
    text_hash,
)
from guard.audit.sqlite import SQLiteAuditStore
from guard.audit.store import AuditObserver, AuditQuery, AuditStore, DailyCount, Retained

__all__ = [
    "AuditObserver",
    "AuditQuery",
    "AuditRecord",
    "AuditStore",
    "CandidateRecord",
    "ChoiceRecord",
    "DailyCount",
    "Feedback",
    "Finished",
    "FoundRecord",
    "RefusalRecord",
    "Retained",
    "SQLiteAuditStore",
    "StepDecision",
    "input_to_keep",
    "record_of",
    "text_hash",
]
