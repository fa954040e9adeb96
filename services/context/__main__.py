"""Entry point: `python -m services.context`."""

from services.context.application import Context
from shared import service, subjects
from shared.service import Answer, Consume, Service

SERVICE = Service(
    name="context",
    open=Context.open,
    consumes=(Consume(subjects.QUOTA, subjects.DURABLE_CONTEXT, Context.handle_decision),),
    answers=(
        Answer(subjects.CONTEXT_STYLES, Context.answer_styles),
        Answer(subjects.CONTEXT_TURNS, Context.answer_turns),
    ),
    publishes=(subjects.RENDER_JOB, subjects.CONVERSATION, subjects.OUTCOME),
    reads=(subjects.OUTCOMES, subjects.CONVERSATIONS),
)

if __name__ == "__main__":
    service.run(SERVICE)
