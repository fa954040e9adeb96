"""Entry point: `python -m services.delivery` (the event consumer, the link signer and the
HTTP server).

The playground acts for its signed-in users through the SDK, so delivery also declares
what a client does (`kiln.client`)."""

from kiln.client import CLIENT_CHANNELS, CLIENT_HEARS, CLIENT_READS
from services.delivery.application import Delivery
from shared import service, subjects
from shared.service import Answer, Consume, Service

SERVICE = Service(
    name="delivery",
    open=Delivery.open,
    consumes=(Consume(subjects.RENDER_EVENTS, subjects.DURABLE_DELIVERY, Delivery.handle_render_event),),
    answers=(Answer(subjects.DELIVERY_LINK, Delivery.answer_link),),
    publishes=(subjects.OUTCOME, *CLIENT_CHANNELS),
    hears=CLIENT_HEARS,
    reads=CLIENT_READS,
    buckets=(subjects.IMAGES, subjects.IMAGE_RECORDS, subjects.ACCOUNTS, subjects.SESSIONS),
    tasks=(Delivery.serve_http,),
)

if __name__ == "__main__":
    service.run(SERVICE)
