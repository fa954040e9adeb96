"""Entry point: `python -m services.quota` (run several for more throughput or redundancy)."""

from services.quota.application import QuotaService as Quota
from shared import service, subjects
from shared.service import Answer, Consume, Listen, Service

SERVICE = Service(
    name="quota",
    open=Quota.open,
    consumes=(
        Consume(subjects.PROMPTS, subjects.DURABLE_QUOTA_PROMPTS, Quota.handle_prompts, batch=lambda s: s.quota_batch),
        Consume(subjects.OUTCOMES, subjects.DURABLE_QUOTA_REFUNDS, Quota.handle_outcome, batch=64),
    ),
    answers=(
        Answer(subjects.QUOTA_STATUS, Quota.answer_status),
        Answer(subjects.QUOTA_PRESSURE, Quota.answer_pressure),
    ),
    listens=(Listen(subjects.FLEET_TELEMETRY, Quota.hear_heartbeat),),
    publishes=(subjects.QUOTA_DECIDED, subjects.OUTCOME, subjects.AUDIT_CHECKPOINT),
    reads=(subjects.OUTCOMES,),
    tasks=(Quota.relay, Quota.checkpoint),
)

if __name__ == "__main__":
    service.run(SERVICE)
